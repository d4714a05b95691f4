// pybind11 bindings: the params struct and the entry points. No torch, no CUDA headers: the Python
// side passes data pointers, shapes, strides and the current stream as integers.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "ttt_params.h"
#include "ttt_step_cpu.h"

namespace py = pybind11;

namespace {
template <typename T>
T* as_ptr(std::uintptr_t v) {
  return reinterpret_cast<T*>(v);
}

// Reads the fields of a params struct from a dict {name: value}: every key must name a field (a
// misspelt one raises instead of leaving its field at the default).
class FieldReader {
 public:
  explicit FieldReader(const py::dict& d, const char* what) : d_(d), what_(what) {}
  template <typename T>
  void operator()(const char* name, T& field) {
    PyObject* v = PyDict_GetItemString(d_.ptr(), name);  // borrowed; null when absent
    if (v == nullptr) return;
    field = py::cast<T>(py::handle(v));
    ++found_;
  }
  void operator()(const char* name, ttt::StepWeights& w) {  // a tuple of pointers W1, b1 (, W2, b2)
    PyObject* v = PyDict_GetItemString(d_.ptr(), name);
    if (v == nullptr) return;
    const auto t = py::cast<py::tuple>(py::handle(v));
    if (t.size() > 4) throw std::invalid_argument(std::string(what_) + "." + name + ": > 4 weights");
    std::uintptr_t* out[4] = {&w.W1, &w.b1, &w.W2, &w.b2};
    for (size_t i = 0; i < t.size(); ++i) *out[i] = t[i].cast<std::uintptr_t>();
    ++found_;
  }
  void done() const {
    if (static_cast<py::ssize_t>(found_) != PyDict_Size(d_.ptr()))
      throw std::invalid_argument(std::string(what_) + ": a key that names no field");
  }

 private:
  const py::dict& d_;
  const char* what_;
  size_t found_ = 0;
};

ttt::StepParams step_params(const py::dict& d) {
  ttt::StepParams p;
  FieldReader f(d, "StepParams");
  f("B", p.B), f("H", p.H), f("D", p.D), f("F", p.F);
  f("float64", p.float64), f("titans", p.titans), f("value_target", p.value_target);
  f("output_residual", p.output_residual), f("eps", p.eps), f("scale", p.scale);
  f("q", p.q), f("k", p.k), f("v", p.v), f("eta", p.eta), f("momentum", p.momentum);
  f("decay", p.decay);
  f("q_sb", p.q_sb), f("q_sh", p.q_sh), f("k_sb", p.k_sb), f("k_sh", p.k_sh);
  f("v_sb", p.v_sb), f("v_sh", p.v_sh), f("eta_sb", p.eta_sb), f("eta_sh", p.eta_sh);
  f("m_sb", p.m_sb), f("m_sh", p.m_sh), f("a_sb", p.a_sb), f("a_sh", p.a_sh);
  f("ln_w", p.ln_w), f("ln_b", p.ln_b), f("params", p.params), f("carry", p.carry);
  f("current", p.current), f("o", p.o), f("weights_out", p.weights_out);
  f("carry_out", p.carry_out);
  f.done();
  return p;
}

ttt::LayerStepParams layer_step_params(const py::dict& d) {
  ttt::LayerStepParams lp;
  FieldReader f(d, "LayerStepParams");
  f("C", lp.C), f("n_rates", lp.n_rates), f("eta_scale", lp.eta_scale);
  f("post_eps", lp.post_eps), f("pre_norm", lp.pre_norm), f("pre_eps", lp.pre_eps);
  f("residual", lp.residual), f("x", lp.x), f("pre_w", lp.pre_w), f("in_w", lp.in_w);
  f("in_b", lp.in_b);
  f("rate_bias", lp.rate_bias), f("post_w", lp.post_w), f("post_b", lp.post_b);
  f("out_w", lp.out_w), f("out_b", lp.out_b), f("gate", lp.gate), f("y", lp.y);
  f.done();
  return lp;
}

void check_cuda(const char* err) {
  if (err != nullptr && err[0] != '\0') throw std::runtime_error(std::string("ttt_cuda: ") + err);
}
}  // namespace

#define TTT_PTR_PROPERTY(cls, name, T) TTT_PTR_PROPERTY_OF(cls, ttt::LinearParams, name, T)
#define TTT_PTR_PROPERTY_OF(cls, S, name, T)                                                \
  cls.def_property(                                                                         \
      #name, [](const S& p) { return reinterpret_cast<std::uintptr_t>(p.name); },           \
      [](S& p, std::uintptr_t v) { p.name = as_ptr<T>(v); })

// The Titans fields (ttt::TitansFields) of a params class.
#define TTT_TITANS_FIELDS(cls, S)                                                        \
  TTT_PTR_PROPERTY_OF(cls, S, mom, const void), TTT_PTR_PROPERTY_OF(cls, S, dec, const void); \
  TTT_PTR_PROPERTY_OF(cls, S, C0, const void), TTT_PTR_PROPERTY_OF(cls, S, cb0, const void);  \
  TTT_PTR_PROPERTY_OF(cls, S, S0, const void), TTT_PTR_PROPERTY_OF(cls, S, sb0, const void);  \
  TTT_PTR_PROPERTY_OF(cls, S, S_end, void), TTT_PTR_PROPERTY_OF(cls, S, sb_end, void);        \
  TTT_PTR_PROPERTY_OF(cls, S, S_starts, void), TTT_PTR_PROPERTY_OF(cls, S, sb_starts, void);  \
  TTT_PTR_PROPERTY_OF(cls, S, dS_end, const void);                                         \
  TTT_PTR_PROPERTY_OF(cls, S, dsb_end, const void);                                        \
  TTT_PTR_PROPERTY_OF(cls, S, dC0, void), TTT_PTR_PROPERTY_OF(cls, S, dcb0, void);            \
  TTT_PTR_PROPERTY_OF(cls, S, dS0, void), TTT_PTR_PROPERTY_OF(cls, S, dsb0, void);            \
  TTT_PTR_PROPERTY_OF(cls, S, dmom, void), TTT_PTR_PROPERTY_OF(cls, S, ddec, void)

PYBIND11_MODULE(_C, m) {
  m.doc() = "ttt-cuda extension: fused TTT-Linear / TTT-MLP forward+backward (C++ CPU and CUDA).";
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
      .def_readwrite("offset", &ttt::LinearParams::offset)
      .def_readwrite("unbounded", &ttt::LinearParams::unbounded)
      .def_readwrite("value_target", &ttt::LinearParams::value_target)
      .def_readwrite("output_residual", &ttt::LinearParams::output_residual)
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
  TTT_PTR_PROPERTY(cls, G0, const void);
  TTT_PTR_PROPERTY(cls, gb0, const void);
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
  TTT_PTR_PROPERTY(cls, dG0, void);
  TTT_PTR_PROPERTY(cls, dgb0, void);
  TTT_PTR_PROPERTY(cls, dln_w, void);
  TTT_PTR_PROPERTY(cls, dln_b, void);
  TTT_PTR_PROPERTY(cls, dscale, void);
  TTT_PTR_PROPERTY(cls, workspace, void);

  // TTT-MLP: the LinearParams fields (W0/b0 = W1/b1 etc.) plus F and layer 2's pointers
  py::class_<ttt::MLPParams, ttt::LinearParams> mlp(m, "MLPParams");
  mlp.def(py::init<>()).def_readwrite("F", &ttt::MLPParams::F);
  TTT_PTR_PROPERTY_OF(mlp, ttt::MLPParams, W20, const void);
  TTT_PTR_PROPERTY_OF(mlp, ttt::MLPParams, b20, const void);
  TTT_PTR_PROPERTY_OF(mlp, ttt::MLPParams, W2_end, void);
  TTT_PTR_PROPERTY_OF(mlp, ttt::MLPParams, b2_end, void);
  TTT_PTR_PROPERTY_OF(mlp, ttt::MLPParams, W2_starts, void);
  TTT_PTR_PROPERTY_OF(mlp, ttt::MLPParams, b2_starts, void);
  TTT_PTR_PROPERTY_OF(mlp, ttt::MLPParams, dW2_end, const void);
  TTT_PTR_PROPERTY_OF(mlp, ttt::MLPParams, db2_end, const void);
  TTT_PTR_PROPERTY_OF(mlp, ttt::MLPParams, dW2_starts, const void);
  TTT_PTR_PROPERTY_OF(mlp, ttt::MLPParams, db2_starts, const void);
  TTT_PTR_PROPERTY_OF(mlp, ttt::MLPParams, dW20, void);
  TTT_PTR_PROPERTY_OF(mlp, ttt::MLPParams, db20, void);
  TTT_PTR_PROPERTY_OF(mlp, ttt::MLPParams, G20, const void);
  TTT_PTR_PROPERTY_OF(mlp, ttt::MLPParams, gb20, const void);
  TTT_PTR_PROPERTY_OF(mlp, ttt::MLPParams, dG20, void);
  TTT_PTR_PROPERTY_OF(mlp, ttt::MLPParams, dgb20, void);
  m.def("mlp_workspace_elems", &ttt::mlp_workspace_elems, py::arg("D"), py::arg("F"),
        py::arg("mini_batch_size"), py::arg("backward"),
        "Scratch elements (fp32) one (batch, head) chain of the MLP op needs.");
  m.def("mlp_fwd_cpu", &ttt::mlp_fwd_cpu, py::arg("params"), py::arg("threads"),
        py::call_guard<py::gil_scoped_release>());
  m.def("mlp_bwd_cpu", &ttt::mlp_bwd_cpu, py::arg("params"), py::arg("threads"),
        py::call_guard<py::gil_scoped_release>());
  m.def("mlp_cpu_block", &ttt::mlp_cpu_block, py::arg("params"), py::arg("backward"),
        py::arg("threads"), py::call_guard<py::gil_scoped_release>());
  m.def("mlp_fwd_cuda", [](const ttt::MLPParams& p) { check_cuda(ttt::mlp_fwd_cuda(p)); });
  m.def("mlp_bwd_cuda", [](const ttt::MLPParams& p) { check_cuda(ttt::mlp_bwd_cuda(p)); });
  m.def("mlp_scratch_in_shared", &ttt::mlp_scratch_in_shared, py::arg("params"),
        py::arg("backward"), "CUDA: the scratch fits in shared memory (else give a workspace).");

  // Titans-form TTT-Linear: the LinearParams fields plus momentum/decay and the extra state
  py::class_<ttt::TitansParams, ttt::LinearParams> titans(m, "TitansParams");
  titans.def(py::init<>());
  TTT_TITANS_FIELDS(titans, ttt::TitansParams);
  m.def("titans_workspace_elems", &ttt::titans_workspace_elems, py::arg("D"),
        py::arg("mini_batch_size"), py::arg("backward"));
  m.def("titans_fwd_cpu", &ttt::titans_fwd_cpu, py::arg("params"), py::arg("threads"),
        py::call_guard<py::gil_scoped_release>());
  m.def("titans_bwd_cpu", &ttt::titans_bwd_cpu, py::arg("params"), py::arg("threads"),
        py::call_guard<py::gil_scoped_release>());
  m.def("titans_cpu_block", &ttt::titans_cpu_block, py::arg("params"), py::arg("backward"),
        py::arg("threads"), py::call_guard<py::gil_scoped_release>());
  m.def("titans_fwd_cuda", [](const ttt::TitansParams& p) { check_cuda(ttt::titans_fwd_cuda(p)); });
  m.def("titans_bwd_cuda", [](const ttt::TitansParams& p) { check_cuda(ttt::titans_bwd_cuda(p)); });
  m.def("titans_scratch_in_shared", &ttt::titans_scratch_in_shared, py::arg("params"),
        py::arg("backward"), "CUDA: the scratch fits in shared memory (else give a workspace).");

  // Titans-form TTT-MLP: the MLPParams fields (P), the Titans fields of layer 1 and layer 2's
  py::class_<ttt::TitansMLPParams, ttt::MLPParams> titans_mlp(m, "TitansMLPParams");
  titans_mlp.def(py::init<>());
  TTT_TITANS_FIELDS(titans_mlp, ttt::TitansMLPParams);
  TTT_PTR_PROPERTY_OF(titans_mlp, ttt::TitansMLPParams, C20, const void);
  TTT_PTR_PROPERTY_OF(titans_mlp, ttt::TitansMLPParams, cb20, const void);
  TTT_PTR_PROPERTY_OF(titans_mlp, ttt::TitansMLPParams, S20, const void);
  TTT_PTR_PROPERTY_OF(titans_mlp, ttt::TitansMLPParams, sb20, const void);
  TTT_PTR_PROPERTY_OF(titans_mlp, ttt::TitansMLPParams, S2_end, void);
  TTT_PTR_PROPERTY_OF(titans_mlp, ttt::TitansMLPParams, sb2_end, void);
  TTT_PTR_PROPERTY_OF(titans_mlp, ttt::TitansMLPParams, S2_starts, void);
  TTT_PTR_PROPERTY_OF(titans_mlp, ttt::TitansMLPParams, sb2_starts, void);
  TTT_PTR_PROPERTY_OF(titans_mlp, ttt::TitansMLPParams, dS2_end, const void);
  TTT_PTR_PROPERTY_OF(titans_mlp, ttt::TitansMLPParams, dsb2_end, const void);
  TTT_PTR_PROPERTY_OF(titans_mlp, ttt::TitansMLPParams, dC20, void);
  TTT_PTR_PROPERTY_OF(titans_mlp, ttt::TitansMLPParams, dcb20, void);
  TTT_PTR_PROPERTY_OF(titans_mlp, ttt::TitansMLPParams, dS20, void);
  TTT_PTR_PROPERTY_OF(titans_mlp, ttt::TitansMLPParams, dsb20, void);
  TTT_PTR_PROPERTY_OF(titans_mlp, ttt::TitansMLPParams, C_starts, void);
  TTT_PTR_PROPERTY_OF(titans_mlp, ttt::TitansMLPParams, cb_starts, void);
  TTT_PTR_PROPERTY_OF(titans_mlp, ttt::TitansMLPParams, C2_starts, void);
  TTT_PTR_PROPERTY_OF(titans_mlp, ttt::TitansMLPParams, cb2_starts, void);
  m.def("titans_mlp_num_blocks", &ttt::titans_mlp_num_blocks, py::arg("L"),
        py::arg("mini_batch_size"), py::arg("offset"), py::arg("unbounded"),
        "Blocks of a Titans-form TTT-MLP call (the op's per-block starts).");
  m.def("titans_mlp_workspace_elems", &ttt::titans_mlp_workspace_elems, py::arg("D"), py::arg("F"),
        py::arg("mini_batch_size"), py::arg("backward"));
  m.def("titans_mlp_fwd_cpu", &ttt::titans_mlp_fwd_cpu, py::arg("params"), py::arg("threads"),
        py::call_guard<py::gil_scoped_release>());
  m.def("titans_mlp_bwd_cpu", &ttt::titans_mlp_bwd_cpu, py::arg("params"), py::arg("threads"),
        py::call_guard<py::gil_scoped_release>());
  m.def("titans_mlp_cpu_block", &ttt::titans_mlp_cpu_block, py::arg("params"), py::arg("backward"),
        py::arg("threads"), py::call_guard<py::gil_scoped_release>());

  m.def("cpu_uses_avx2", &ttt::cpu_uses_avx2,
        "Whether the CPU path runs its AVX2 build (same results as the portable build).");
  m.def("linear_workspace_elems", &ttt::linear_workspace_elems, py::arg("D"),
        py::arg("mini_batch_size"), py::arg("backward"),
        "Scratch elements (fp32) one (batch, head) chain needs.");
  m.def("linear_fwd_cpu", &ttt::linear_fwd_cpu, py::arg("params"), py::arg("threads"),
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_bwd_cpu", &ttt::linear_bwd_cpu, py::arg("params"), py::arg("threads"),
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_cpu_block", &ttt::linear_cpu_block, py::arg("params"), py::arg("backward"),
        py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
        "CPU run with `threads` threads per chain and barriers, as a CUDA block runs (tests).");
  m.def("linear_fwd_cuda", [](const ttt::LinearParams& p) { check_cuda(ttt::linear_fwd_cuda(p)); });
  m.def("linear_bwd_cuda", [](const ttt::LinearParams& p) { check_cuda(ttt::linear_bwd_cuda(p)); });
  m.def("linear_scratch_in_shared", &ttt::linear_scratch_in_shared, py::arg("params"),
        py::arg("backward"), "CUDA: the scratch fits in shared memory (else give a workspace).");

  // the fused single-token streaming step (CPU) and the whole TTTLayer step around it: their
  // fields (StepParams, LayerStepParams in ttt_step_cpu.h) come in one dict per struct, read once
  // (a token's call costs one Python->C++ crossing, not one per field)
  m.def(
      "ttt_step_cpu",
      [](const py::dict& step, int threads) {
        const ttt::StepParams p = step_params(step);
        py::gil_scoped_release release;
        ttt::ttt_step_cpu(p, threads);
      },
      py::arg("step"), py::arg("threads"),
      "One streaming token of TTT-Linear / TTT-MLP (plain or Titans form) on the CPU; `step`: "
      "StepParams' fields by name (weights: tuples of pointers W1, b1, W2, b2).");
  m.def(
      "ttt_layer_step_cpu",
      [](const py::dict& layer, const py::dict& step, int threads) {
        const ttt::LayerStepParams lp = layer_step_params(layer);
        const ttt::StepParams p = step_params(step);
        py::gil_scoped_release release;
        ttt::ttt_layer_step_cpu(lp, p, threads);
      },
      py::arg("layer"), py::arg("step"), py::arg("threads"),
      "One streaming token of a whole TTTLayer (projections, step, post-norm, gate) on the CPU; "
      "`layer`: LayerStepParams' fields by name, `step`: the step's state and options.");
}
