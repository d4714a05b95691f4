"""Check ttt-gemma's pi0.5 checkpoints and outputs against openpi's own PyTorch ``PI0Pytorch``.

Not a CI test: it needs openpi's source and transformers 4.53.2 with openpi's
``transformers_replace`` files copied over it, while ttt-gemma needs transformers >= 5. So it
runs in two virtual environments and passes safetensors files between them; run it from the
ttt-gemma one, which starts the openpi one as a subprocess (``--side openpi``).

Recipe (CPU, a few minutes; the openpi source is read, JAX is not installed)::

    git clone https://github.com/Physical-Intelligence/openpi /tmp/openpi
    python3 -m venv /tmp/venv-openpi
    /tmp/venv-openpi/bin/pip install torch==2.13.0  # first: the CPU wheel
    /tmp/venv-openpi/bin/pip install transformers==4.53.2 safetensors numpy
    cp -r /tmp/openpi/src/openpi/models_pytorch/transformers_replace/* \\
        /tmp/venv-openpi/lib/python3.11/site-packages/transformers/
    # ttt-gemma's environment (transformers >= 5), e.g. the repository's .venv:
    .venv/bin/pip install -e packages/ttt-core -e packages/ttt-gemma
    .venv/bin/python packages/ttt-gemma/tools/check_openpi.py \\
        --openpi-src /tmp/openpi/src --openpi-python /tmp/venv-openpi/bin/python \\
        --openpi-rev "$(git -C /tmp/openpi rev-parse --short HEAD)" \\
        --out benchmarks/results/gemma_openpi_check.json

What it does, at openpi's own ``"dummy"`` Gemma variant for both the VLM and the expert (width
64, depth 4, 8 heads, 1 KV head, head dim 16; openpi's 257152-token vocabulary) and a small
SigLIP (width 32, 2 layers, 28 x 28 images, patch 14; openpi's MLP 4304):

1. ttt-gemma builds a :class:`~ttt_gemma.Pi05Policy` (TTT off), draws random weights and inputs
   and writes ``save_pi05`` -> ``ours.safetensors``.
2. openpi builds ``PI0Pytorch(pi05=True)`` and reads that file with the call its loader makes,
   ``safetensors.torch.load_model(model, path)`` (strict); it computes, on the same inputs, its
   training loss, its velocity at t = 1 (a 1-step ``sample_actions``) and a 10-step sample.
   It then draws new weights and writes them with openpi's own save call
   (``safetensors.torch.save_model``) -> ``openpi.safetensors`` and computes the same outputs.
3. ttt-gemma loads ``openpi.safetensors`` with ``load_pi05`` (strict) and compares both sets of
   outputs (max abs differences).

Deviations from openpi, both forced by the small sizes: openpi builds SigLIP from transformers'
PaliGemma defaults (So400m) and its projector with ``projection_dim=2048`` (its gemma_2b
width); here the defaults are a small SigLIP and the projector is replaced by a Linear of the
same name to the VLM's width 64. openpi's image preprocessing (resize, augmentations) is skipped:
both models get the same already-preprocessed images.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import types
from pathlib import Path

import torch

DUMMY = dict(width=64, depth=4, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16)  # openpi
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
              image_size=28)  # fmt: skip
VISION_MLP = 4304  # openpi sets it whatever the defaults
VOCAB = 257_152
ACTION_DIM, HORIZON, BATCH, CAMERAS, TOKENS = 6, 5, 2, 2, 7
OUTPUTS = ("loss", "velocity_t1", "sample_10")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter (zero-initialised AdaRMS and norms included) ~ N(0, 0.05^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Preprocessed images [B, N, 3, S, S] in [-1, 1], masks (camera 1 missing in sample 0),
    prompt tokens with padding, actions, noise, times."""
    gen = torch.Generator().manual_seed(seed)
    S = VISION["image_size"]
    token_masks = torch.ones(BATCH, TOKENS, dtype=torch.bool)
    token_masks[1, 4:] = False
    image_masks = torch.ones(BATCH, CAMERAS, dtype=torch.bool)
    image_masks[0, 1] = False
    return dict(
        images=torch.rand(BATCH, CAMERAS, 3, S, S, generator=gen) * 2 - 1,
        image_masks=image_masks,
        tokens=torch.randint(0, 1000, (BATCH, TOKENS), generator=gen),
        token_masks=token_masks,
        actions=torch.randn(BATCH, HORIZON, ACTION_DIM, generator=gen),
        noise=torch.randn(BATCH, HORIZON, ACTION_DIM, generator=gen),
        time=torch.tensor([0.3, 0.85]),
    )


# ---------------------------------------------------------------------------------- openpi side
def _import_openpi(src: Path):
    """openpi's ``pi0_pytorch`` without JAX: ``openpi.models.gemma`` is replaced by its own
    ``Config``/``get_config`` (taken from the source file), and the image preprocessing module
    (JAX-based ``image_tools``) by an empty one, since the inputs come preprocessed."""
    from dataclasses import dataclass

    sys.path.insert(0, str(src))
    tree = ast.parse((src / "openpi/models/gemma.py").read_text())
    keep = [n for n in tree.body if getattr(n, "name", None) in ("Config", "get_config")
            or (isinstance(n, ast.Assign) and n.targets[0].id == "PALIGEMMA_VOCAB_SIZE")]  # fmt: skip
    gemma = types.ModuleType("openpi.models.gemma")

    @dataclass
    class LoRAConfig:  # only named by the LoRA variants, not used here
        rank: int
        alpha: float = 1.0

    gemma.__dict__.update(dataclasses=__import__("dataclasses"), Literal=__import__("typing").Literal,
                          lora=types.SimpleNamespace(LoRAConfig=LoRAConfig))  # fmt: skip
    import openpi.models  # an empty package

    sys.modules["openpi.models.gemma"] = openpi.models.gemma = gemma
    exec(compile(ast.Module(keep, []), str(src / "openpi/models/gemma.py"), "exec"), gemma.__dict__)
    sys.modules["openpi.models_pytorch.preprocessing_pytorch"] = types.ModuleType("preprocessing")
    import openpi.models_pytorch.gemma_pytorch as gemma_pytorch
    import openpi.models_pytorch.pi0_pytorch as pi0_pytorch
    from transformers import PaliGemmaConfig
    from transformers.models.auto import CONFIG_MAPPING

    # openpi builds PaliGemma from transformers' defaults (SigLIP So400m): a small SigLIP instead
    gemma_pytorch.CONFIG_MAPPING = {
        "paligemma": lambda: PaliGemmaConfig(vision_config=dict(VISION, vision_use_head=False)),
        "gemma": CONFIG_MAPPING["gemma"],
    }
    return gemma, pi0_pytorch


def _openpi_config(vlm: str, expert: str, action_dim: int, horizon: int):
    """The fields of openpi's ``Pi0Config`` that ``PI0Pytorch`` reads."""
    return types.SimpleNamespace(pi05=True, paligemma_variant=vlm, action_expert_variant=expert,
                                 dtype="float32", action_dim=action_dim, action_horizon=horizon,
                                 pytorch_compile_mode=None)  # fmt: skip


def _openpi_full_size_file_shapes(pi0_pytorch) -> dict[str, list[int]]:
    """Key -> shape of the file openpi's ``save_model`` writes for the real pi0.5 (gemma_2b VLM,
    gemma_300m expert, SigLIP So400m, 32 action dims, horizon 50), built on the meta device:
    the state dict less the later names (in sorted order) of tied tensors."""
    from transformers.models.auto import CONFIG_MAPPING

    small = pi0_pytorch.PaliGemmaWithExpertModel.__init__.__globals__["CONFIG_MAPPING"]
    pi0_pytorch.PaliGemmaWithExpertModel.__init__.__globals__["CONFIG_MAPPING"] = CONFIG_MAPPING
    try:
        with torch.device("meta"):
            model = pi0_pytorch.PI0Pytorch(_openpi_config("gemma_2b", "gemma_300m", 32, 50))
    finally:
        pi0_pytorch.PaliGemmaWithExpertModel.__init__.__globals__["CONFIG_MAPPING"] = small
    kept: dict[int, str] = {}
    for name, t in sorted(model.state_dict(keep_vars=True).items()):
        kept.setdefault(id(t), name)
    state = model.state_dict(keep_vars=True)
    return {name: list(state[name].shape) for name in kept.values()}


def _openpi_model(pi0_pytorch):
    model = pi0_pytorch.PI0Pytorch(_openpi_config("dummy", "dummy", ACTION_DIM, HORIZON))
    pg = model.paligemma_with_expert.paligemma.model
    # openpi's projector is Linear(vision width, 2048) (gemma_2b's width): to the dummy width
    pg.multi_modal_projector.linear = torch.nn.Linear(VISION["hidden_size"], DUMMY["width"])
    model.eval()
    return model


def _openpi_outputs(model, x: dict) -> dict[str, torch.Tensor]:
    images = [x["images"][:, i] for i in range(CAMERAS)]
    masks = [x["image_masks"][:, i] for i in range(CAMERAS)]
    model._preprocess_observation = lambda obs, train=True: (
        images,
        masks,
        x["tokens"],
        x["token_masks"],
        obs.state,
    )
    obs = types.SimpleNamespace(state=torch.zeros(BATCH, ACTION_DIM))
    with torch.no_grad():
        loss = model.forward(obs, x["actions"], noise=x["noise"], time=x["time"]).mean()
        step1 = model.sample_actions(torch.device("cpu"), obs, noise=x["noise"], num_steps=1)
        sample = model.sample_actions(torch.device("cpu"), obs, noise=x["noise"], num_steps=10)
    return dict(loss=loss, velocity_t1=x["noise"] - step1, sample_10=sample)  # x - 1 * v


def openpi_side(src: Path, work: Path) -> None:
    from safetensors.torch import load_file, load_model, save_file, save_model

    gemma, pi0_pytorch = _import_openpi(src)
    assert gemma.get_config("dummy") == gemma.Config(**DUMMY), gemma.get_config("dummy")
    x = load_file(work / "inputs.safetensors")
    model = _openpi_model(pi0_pytorch)
    missing, unexpected = load_model(model, work / "ours.safetensors")  # openpi's call, strict
    import transformers

    report = dict(load_strict_missing=list(missing), load_strict_unexpected=list(unexpected),
                  n_model_tensors=len(model.state_dict()), n_file_tensors=len(load_file(
                      work / "ours.safetensors")),
                  openpi_env=dict(torch=torch.__version__, transformers=transformers.__version__))  # fmt: skip
    save_file(_openpi_outputs(model, x), work / "openpi_out_ours.safetensors")
    _randomize(model, seed=1)
    save_model(model, work / "openpi.safetensors")  # openpi's training script's save call
    save_file(_openpi_outputs(model, x), work / "openpi_out_openpi.safetensors")
    (work / "openpi_report.json").write_text(json.dumps(report))
    full = _openpi_full_size_file_shapes(pi0_pytorch)
    (work / "openpi_full_size_shapes.json").write_text(json.dumps(full))


# ------------------------------------------------------------------------------- ttt-gemma side
def _ttt_model(use_ttt: bool = False):
    from ttt_gemma import ActionExpertConfig, Pi05Policy
    from ttt_gemma.paligemma import PaliGemmaPrefixConfig

    expert = ActionExpertConfig(**DUMMY, action_dim=ACTION_DIM, action_horizon=HORIZON,
                                use_ttt=use_ttt)  # fmt: skip
    prefix = PaliGemmaPrefixConfig(
        vision_width=VISION["hidden_size"], vision_mlp_dim=VISION_MLP,
        vision_depth=VISION["num_hidden_layers"], vision_heads=VISION["num_attention_heads"],
        patch_size=VISION["patch_size"], image_size=VISION["image_size"], vocab_size=VOCAB,
        **DUMMY,
    )  # fmt: skip
    return Pi05Policy(prefix, expert).eval()


def _full_size_names(work: Path) -> dict:
    """ttt-gemma's ``save_pi05`` key set and shapes for the real pi0.5 (meta device) against
    openpi's."""
    from ttt_gemma import ActionExpertConfig, Pi05Policy
    from ttt_gemma.checkpoint import policy_to_pi05_names
    from ttt_gemma.paligemma import PaliGemmaPrefixConfig

    with torch.device("meta"):
        policy = Pi05Policy(PaliGemmaPrefixConfig(), ActionExpertConfig.gemma_300m())
    ours = {k: list(v.shape) for k, v in policy_to_pi05_names(policy, "openpi").items()}
    theirs = json.loads((work / "openpi_full_size_shapes.json").read_text())
    return dict(n_openpi=len(theirs), n_ours=len(ours),
                missing=sorted(set(theirs) - set(ours)), unexpected=sorted(set(ours) - set(theirs)),
                shape_mismatch=sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k]))  # fmt: skip


def _ttt_outputs(policy, x: dict) -> dict[str, torch.Tensor]:
    obs = (x["images"], x["image_masks"], x["tokens"], x["token_masks"])
    with torch.no_grad():
        kv = policy.prefix(*obs)
        t1 = torch.ones(BATCH)
        return dict(loss=policy.loss(*obs, x["actions"], noise=x["noise"], t=x["time"]),
                    velocity_t1=policy.policy.velocity(x["noise"], t1, kv),
                    sample_10=policy.sample(*obs, noise=x["noise"]))  # fmt: skip


def _max_diffs(a: dict, b: dict) -> dict[str, float]:
    return {k: float((a[k].double() - b[k].double()).abs().max()) for k in OUTPUTS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--openpi-src", type=Path, required=True, help="openpi's src/ folder")
    ap.add_argument("--openpi-python", help="python of the openpi environment")
    ap.add_argument("--work", type=Path, default=Path("/tmp/openpi-check"))
    ap.add_argument("--out", type=Path, help="JSON report")
    ap.add_argument("--openpi-rev", default="", help="openpi commit, recorded in the report")
    ap.add_argument("--side", choices=("ttt", "openpi"), default="ttt")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.side == "openpi":
        return openpi_side(args.openpi_src, args.work)

    from safetensors.torch import load_file, save_file

    from ttt_gemma import load_pi05, save_pi05

    x = _inputs()
    save_file(x, args.work / "inputs.safetensors")
    policy = _ttt_model()
    _randomize(policy, seed=0)
    save_pi05(policy, args.work / "ours.safetensors")
    ours = _ttt_outputs(policy, x)
    subprocess.run([args.openpi_python, __file__, "--side", "openpi", "--openpi-src",
                    str(args.openpi_src), "--work", str(args.work)], check=True)  # fmt: skip
    import transformers

    report = dict(
        check="ttt-gemma save_pi05/load_pi05 and outputs vs openpi's PI0Pytorch (pi0.5, fp32, CPU)",
        command=" ".join(sys.argv), openpi_rev=args.openpi_rev,
        sizes=dict(gemma_variant="dummy", **DUMMY, vision=VISION, vision_mlp=VISION_MLP,
                   vocab=VOCAB, action_dim=ACTION_DIM, horizon=HORIZON, batch=BATCH,
                   cameras=CAMERAS, tokens=TOKENS),
        ttt_env=dict(torch=torch.__version__, transformers=transformers.__version__),
        **json.loads((args.work / "openpi_report.json").read_text()),
    )  # fmt: skip
    theirs_a = load_file(args.work / "openpi_out_ours.safetensors")
    theirs_b = load_file(args.work / "openpi_out_openpi.safetensors")
    fresh, with_ttt = _ttt_model(), _ttt_model(use_ttt=True)  # TTT in every layer, zero gates
    load = load_pi05(fresh, args.work / "openpi.safetensors")  # strict
    ttt_left = load_pi05(with_ttt, args.work / "openpi.safetensors").missing_ttt
    report.update(
        ours_file_to_openpi_max_abs_diff=_max_diffs(ours, theirs_a),
        openpi_file_to_ours_max_abs_diff=_max_diffs(_ttt_outputs(fresh, x), theirs_b),
        openpi_file_to_ours_ttt_zero_gates_max_abs_diff=_max_diffs(
            _ttt_outputs(with_ttt, x), theirs_b),
        full_size_save_pi05_keys_vs_openpi=_full_size_names(args.work),
        control_other_weights_max_abs_diff=_max_diffs(ours, theirs_b),  # must be large
        load_pi05_of_openpi_file=dict(naming=load.naming, loaded=len(load.loaded),
                                      ignored=load.ignored, ttt_params_left_at_init=len(ttt_left)),
        magnitudes_ours={k: float(v.abs().max()) for k, v in ours.items()},
    )  # fmt: skip
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
