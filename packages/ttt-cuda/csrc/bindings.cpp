// pybind11 bindings: the params struct and the entry points. No torch, no CUDA headers: the Python
// side passes data pointers, shapes, strides and the current stream as integers.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "ttt_params.h"

namespace py = pybind11;

namespace {
template <typename T>
T* as_ptr(std::uintptr_t v) {
  return reinterpret_cast<T*>(v);
}

void check_cuda(const char* err) {
  if (err != nullptr && err[0] != '\0') throw std::runtime_error(std::string("ttt_cuda: ") + err);
}
}  // namespace

#define TTT_PTR_PROPERTY(cls, name, T)                                                        \
  cls.def_property(                                                                           \
      #name, [](const ttt::LinearParams& p) { return reinterpret_cast<std::uintptr_t>(p.name); }, \
      [](ttt::LinearParams& p, std::uintptr_t v) { p.name = as_ptr<T>(v); })

PYBIND11_MODULE(_C, m) {
  m.doc() = "ttt-cuda extension: fused TTT-Linear forward/backward (C++ CPU and CUDA).";
#ifdef TTT_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
#ifdef TTT_CUDA_ARCHS
  m.attr("CUDA_ARCHITECTURES") = TTT_CUDA_ARCHS;
#else
  m.attr("CUDA_ARCHITECTURES") = "";
#endif

  py::enum_<ttt::DType>(m, "DType")
      .value("float32", ttt::DType::kFloat32)
      .value("float64", ttt::DType::kFloat64)
      .value("bfloat16", ttt::DType::kBFloat16)
      .value("float16", ttt::DType::kFloat16);

  py::class_<ttt::LinearParams> cls(m, "LinearParams");
  cls.def(py::init<>())
      .def_readwrite("B", &ttt::LinearParams::B)
      .def_readwrite("H", &ttt::LinearParams::H)
      .def_readwrite("L", &ttt::LinearParams::L)
      .def_readwrite("D", &ttt::LinearParams::D)
      .def_readwrite("mini_batch_size", &ttt::LinearParams::mini_batch_size)
      .def_readwrite("causal", &ttt::LinearParams::causal)
      .def_readwrite("eps", &ttt::LinearParams::eps)
      .def_readwrite("end_unscaled", &ttt::LinearParams::end_unscaled)
      .def_readwrite("dtype", &ttt::LinearParams::dtype)
      .def_readwrite("q_sb", &ttt::LinearParams::q_sb)
      .def_readwrite("q_sh", &ttt::LinearParams::q_sh)
      .def_readwrite("q_sl", &ttt::LinearParams::q_sl)
      .def_readwrite("k_sb", &ttt::LinearParams::k_sb)
      .def_readwrite("k_sh", &ttt::LinearParams::k_sh)
      .def_readwrite("k_sl", &ttt::LinearParams::k_sl)
      .def_readwrite("v_sb", &ttt::LinearParams::v_sb)
      .def_readwrite("v_sh", &ttt::LinearParams::v_sh)
      .def_readwrite("v_sl", &ttt::LinearParams::v_sl)
      .def_readwrite("do_sb", &ttt::LinearParams::do_sb)
      .def_readwrite("do_sh", &ttt::LinearParams::do_sh)
      .def_readwrite("do_sl", &ttt::LinearParams::do_sl)
      .def_readwrite("max_smem", &ttt::LinearParams::max_smem)
      .def_readwrite("stream", &ttt::LinearParams::stream);
  TTT_PTR_PROPERTY(cls, q, const void);
  TTT_PTR_PROPERTY(cls, k, const void);
  TTT_PTR_PROPERTY(cls, v, const void);
  TTT_PTR_PROPERTY(cls, eta, const void);
  TTT_PTR_PROPERTY(cls, ln_w, const void);
  TTT_PTR_PROPERTY(cls, ln_b, const void);
  TTT_PTR_PROPERTY(cls, scale, const void);
  TTT_PTR_PROPERTY(cls, W0, const void);
  TTT_PTR_PROPERTY(cls, b0, const void);
  TTT_PTR_PROPERTY(cls, o, void);
  TTT_PTR_PROPERTY(cls, W_end, void);
  TTT_PTR_PROPERTY(cls, b_end, void);
  TTT_PTR_PROPERTY(cls, W_starts, void);
  TTT_PTR_PROPERTY(cls, b_starts, void);
  TTT_PTR_PROPERTY(cls, dO, const void);
  TTT_PTR_PROPERTY(cls, dW_end, const void);
  TTT_PTR_PROPERTY(cls, db_end, const void);
  TTT_PTR_PROPERTY(cls, dW_starts, const void);
  TTT_PTR_PROPERTY(cls, db_starts, const void);
  TTT_PTR_PROPERTY(cls, dq, void);
  TTT_PTR_PROPERTY(cls, dk, void);
  TTT_PTR_PROPERTY(cls, dv, void);
  TTT_PTR_PROPERTY(cls, deta, void);
  TTT_PTR_PROPERTY(cls, dW0, void);
  TTT_PTR_PROPERTY(cls, db0, void);
  TTT_PTR_PROPERTY(cls, dln_w, void);
  TTT_PTR_PROPERTY(cls, dln_b, void);
  TTT_PTR_PROPERTY(cls, dscale, void);
  TTT_PTR_PROPERTY(cls, workspace, void);

  m.def("linear_workspace_elems", &ttt::linear_workspace_elems, py::arg("D"),
        py::arg("mini_batch_size"), py::arg("backward"),
        "Scratch elements (fp32) one (batch, head) chain needs.");
  m.def("linear_fwd_cpu", &ttt::linear_fwd_cpu, py::call_guard<py::gil_scoped_release>());
  m.def("linear_bwd_cpu", &ttt::linear_bwd_cpu, py::call_guard<py::gil_scoped_release>());
  m.def("linear_cpu_block", &ttt::linear_cpu_block, py::arg("params"), py::arg("backward"),
        py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
        "CPU run with `threads` threads per chain and barriers, as a CUDA block runs (tests).");
  m.def("linear_fwd_cuda", [](const ttt::LinearParams& p) { check_cuda(ttt::linear_fwd_cuda(p)); });
  m.def("linear_bwd_cuda", [](const ttt::LinearParams& p) { check_cuda(ttt::linear_bwd_cuda(p)); });
}
