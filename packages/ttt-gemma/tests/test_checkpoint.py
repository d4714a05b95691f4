"""pi0.5 checkpoints in openpi and lerobot naming; our own checkpoints."""

import pytest
import torch
from conftest import make_prefix
from safetensors.torch import save_file

from ttt_gemma import (
    ActionExpertConfig,
    FlowMatchingPolicy,
    load_checkpoint,
    load_pi05,
    save_checkpoint,
    save_pi05,
)

CFG = ActionExpertConfig.tiny()


def pi05_tensors(cfg: ActionExpertConfig, prefix: str, depth: int | None = None) -> dict:
    """A pi0.5 action-expert state dict spelled out by hand, with random tensors."""
    W, H, KV, D, M = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    e = prefix + "paligemma_with_expert.gemma_expert."
    out = {}
    for i in range(cfg.depth if depth is None else depth):
        L = f"{e}model.layers.{i}."
        out[L + "self_attn.q_proj.weight"] = torch.randn(H * D, W)
        out[L + "self_attn.k_proj.weight"] = torch.randn(KV * D, W)
        out[L + "self_attn.v_proj.weight"] = torch.randn(KV * D, W)
        out[L + "self_attn.o_proj.weight"] = torch.randn(W, H * D)
        out[L + "mlp.gate_proj.weight"] = torch.randn(M, W)
        out[L + "mlp.up_proj.weight"] = torch.randn(M, W)
        out[L + "mlp.down_proj.weight"] = torch.randn(W, M)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[L + f"{norm}.dense.weight"] = torch.randn(3 * W, W)
            out[L + f"{norm}.dense.bias"] = torch.randn(3 * W)
    out[e + "model.norm.dense.weight"] = torch.randn(3 * W, W)
    out[e + "model.norm.dense.bias"] = torch.randn(3 * W)
    out[e + "lm_head.weight"] = torch.randn(8, W)  # unused by the expert
    for name, shape in (
        ("action_in_proj", (W, cfg.action_dim)),
        ("action_out_proj", (cfg.action_dim, W)),
        ("time_mlp_in", (W, W)),
        ("time_mlp_out", (W, W)),
    ):
        out[f"{prefix}{name}.weight"] = torch.randn(shape)
        out[f"{prefix}{name}.bias"] = torch.randn(shape[0])
    # a piece of the VLM, which the action expert does not load
    out[prefix + "paligemma_with_expert.paligemma.model.language_model.norm.weight"] = torch.ones(4)
    return out


def ours(file_key: str, prefix: str) -> str:
    """The expected policy name of a file key, written independently of the loader."""
    k = file_key[len(prefix) :]
    return k.replace("paligemma_with_expert.gemma_expert.model.", "expert.")


@pytest.mark.parametrize("naming,prefix", [("openpi", ""), ("lerobot", "model.")])
@pytest.mark.parametrize("use_ttt", [False, True], ids=["base", "ttt"])
def test_load_pi05_naming(tmp_path, naming, prefix, use_ttt):
    tensors = pi05_tensors(CFG, prefix)
    if naming == "lerobot":  # lerobot keeps normaliser buffers outside `model.`
        tensors["normalize_inputs.buffer_observation_state.mean"] = torch.zeros(3)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    policy = FlowMatchingPolicy(CFG.replace(use_ttt=use_ttt))
    ttt_before = {k: v.clone() for k, v in policy.state_dict().items() if ".ttt." in k}
    report = load_pi05(policy, path)
    assert report.naming == naming
    state = policy.state_dict()
    n_loaded = 0
    for key, tensor in tensors.items():
        if "lm_head" in key or "paligemma." in key or not key.startswith(prefix):
            continue
        assert torch.equal(state[ours(key, prefix)], tensor), key
        n_loaded += 1
    assert n_loaded == len(report.loaded) == sum(".ttt." not in k for k in state)
    for k, v in ttt_before.items():  # TTT parameters keep their initialisation
        assert torch.equal(state[k], v)
    assert bool(ttt_before) == use_ttt


def test_pretrained_checkpoint_with_ttt_starts_from_the_same_policy(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(pi05_tensors(CFG, ""), str(path))
    base, with_ttt = FlowMatchingPolicy(CFG), FlowMatchingPolicy(CFG.replace(use_ttt=True))
    load_pi05(base, path)
    load_pi05(with_ttt, path)
    _, _, _, prefix = make_prefix(CFG)
    x_t, t = torch.randn(2, CFG.action_horizon, CFG.action_dim), torch.rand(2)
    assert torch.equal(base.velocity(x_t, t, prefix), with_ttt.velocity(x_t, t, prefix))


def test_load_pi05_is_strict(tmp_path):
    path = tmp_path / "model.safetensors"
    t = pi05_tensors(CFG, "")
    del t["paligemma_with_expert.gemma_expert.model.layers.1.mlp.up_proj.weight"]
    save_file(t, str(path))
    with pytest.raises(ValueError, match=r"missing .*layers\.1\.mlp\.up_proj"):
        load_pi05(FlowMatchingPolicy(CFG), path)
    save_file(pi05_tensors(CFG, "", depth=CFG.depth + 1), str(path))  # one layer too many
    with pytest.raises(ValueError, match=r"unexpected .*layers\.2\."):
        load_pi05(FlowMatchingPolicy(CFG), path)
    t = pi05_tensors(CFG, "")
    t["paligemma_with_expert.gemma_expert.model.norm.dense.bias"] = torch.zeros(5)
    save_file(t, str(path))
    with pytest.raises(ValueError, match="shape"):
        load_pi05(FlowMatchingPolicy(CFG), path)
    save_file({"foo.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="gemma_expert"):
        load_pi05(FlowMatchingPolicy(CFG), path)


@pytest.mark.parametrize("naming", ["openpi", "lerobot"])
def test_save_pi05_round_trip(tmp_path, naming):
    src = FlowMatchingPolicy(CFG.replace(use_ttt=True))
    save_pi05(src, tmp_path / "pi05.safetensors", naming)
    dst = FlowMatchingPolicy(CFG)
    assert load_pi05(dst, tmp_path / "pi05.safetensors").naming == naming
    for k, v in dst.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k


def test_own_checkpoint_is_bit_identical_and_atomic(tmp_path):
    src = FlowMatchingPolicy(CFG.replace(use_ttt=True, ttt=dict(layer=dict(inner="mlp"))))
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    path = tmp_path / "ckpt" / "policy.safetensors"
    save_checkpoint(src, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["policy.safetensors"]
    dst = FlowMatchingPolicy(CFG.replace(use_ttt=True, ttt=dict(layer=dict(inner="mlp"))))
    load_checkpoint(dst, path)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


def _snapshot(policy: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in policy.state_dict().items()}


@pytest.mark.parametrize("bad", ["last-tensor-misshaped", "one-missing", "one-unexpected"])
def test_failed_own_load_leaves_the_policy_unchanged(tmp_path, bad):
    cfg = CFG.replace(use_ttt=True)
    src = FlowMatchingPolicy(cfg)
    tensors = {k: torch.randn_like(v) for k, v in src.state_dict().items()}
    names = sorted(tensors)  # the bad tensor sorts after most others: copying first would be seen
    if bad == "last-tensor-misshaped":
        tensors[names[-1]] = torch.zeros(3, 5)
    elif bad == "one-missing":
        del tensors[names[-1]]
    else:
        tensors["expert.layers.9.extra"] = torch.zeros(2)
    path = tmp_path / "policy.safetensors"
    save_file(tensors, str(path))
    dst = FlowMatchingPolicy(cfg)
    before = _snapshot(dst)
    with pytest.raises(ValueError, match=r"policy\.safetensors"):
        load_checkpoint(dst, path)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_failed_pi05_load_leaves_the_policy_unchanged(tmp_path):
    t = pi05_tensors(CFG, "")
    t["time_mlp_out.bias"] = torch.zeros(3)  # sorts last among the mapped names
    save_file(t, str(tmp_path / "model.safetensors"))
    dst = FlowMatchingPolicy(CFG)
    before = _snapshot(dst)
    with pytest.raises(ValueError, match=r"time_mlp_out\.bias: file \(3,\)"):
        load_pi05(dst, tmp_path / "model.safetensors")
    for k, v in dst.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("loader", [load_checkpoint, load_pi05], ids=["own", "pi05"])
def test_truncated_file_names_itself(tmp_path, loader):
    path = tmp_path / "cut.safetensors"
    save_checkpoint(FlowMatchingPolicy(CFG), path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"cut\.safetensors"):
        loader(FlowMatchingPolicy(CFG), path)
