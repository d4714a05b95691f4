"""Checkpoints: load pi0.5 action-expert weights (openpi / lerobot naming); save/load our own.

Name mapping (``<i>`` a layer index; ``{...}`` alternatives), ours on the right:

=====================================================================  ==========================
openpi ``model.safetensors`` (converted PyTorch pi0.5)                  ``FlowMatchingPolicy``
=====================================================================  ==========================
``paligemma_with_expert.gemma_expert.model.layers.<i>.<rest>``          ``expert.layers.<i>.<rest>``
``paligemma_with_expert.gemma_expert.model.norm.<rest>``                ``expert.norm.<rest>``
``{action_in_proj,action_out_proj,time_mlp_in,time_mlp_out}.<p>``       same name
``paligemma_with_expert.paligemma.*``, ``...gemma_expert.lm_head.*``,   ignored (the VLM, unused
``...gemma_expert.model.embed_tokens.*``                                expert embeddings)
=====================================================================  ==========================

lerobot's pi05 policy stores the same tensors under one more ``model.`` prefix
(``model.paligemma_with_expert.gemma_expert.model.layers.<i>...``, ``model.action_in_proj...``).
``<rest>`` is ``input_layernorm.dense.{weight,bias}``, ``post_attention_layernorm.dense.{weight,
bias}``, ``self_attn.{q,k,v,o}_proj.weight``, ``mlp.{gate,up,down}_proj.weight`` (pi0.5: AdaRMS
``dense``; a pi0 checkpoint has ``input_layernorm.weight`` instead and loads into
``use_adarms=False``). The VLM's token embedding is tied to its ``lm_head``: openpi writes it
once, as ``paligemma_with_expert.paligemma.lm_head.weight`` (``safetensors.torch.save_model``),
and so does :func:`save_pi05`; a file with ``...embed_tokens.weight`` (or both) loads too.
Loading is strict: every parameter except the new TTT ones must be present
with the right shape, and every expert/head tensor of the file must be used.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ttt_core.runfiles import atomic_path

NAMINGS = ("openpi", "lerobot")
_EXPERT = "paligemma_with_expert.gemma_expert."
_HEAD_NAMES = (
    "action_in_proj",
    "action_out_proj",
    "time_mlp_in",
    "time_mlp_out",
    "action_time_mlp_in",
    "action_time_mlp_out",
)
_VLM = "paligemma_with_expert.paligemma."
_VISION_FILE = "model.vision_tower.vision_model."  # openpi's files (transformers 4.x)
_VISION_OURS = "model.vision_tower."  # transformers 5.x
_EMBED = "model.language_model.embed_tokens.weight"  # the VLM's, tied to its lm_head
_IGNORED = re.compile(
    r"^(paligemma_with_expert\.paligemma\.|paligemma_with_expert\.gemma_expert\.lm_head\."
    r"|paligemma_with_expert\.gemma_expert\.model\.embed_tokens\.|state_proj\.)"
)


@dataclass
class LoadReport:
    """What a pi0.5 load did: ``loaded`` our parameter names, ``ignored`` file keys (VLM etc.),
    ``missing_ttt`` the TTT parameters left at their initialisation."""

    naming: str
    loaded: list[str]
    ignored: list[str]
    missing_ttt: list[str]


def detect_naming(keys) -> str:
    """``"lerobot"`` if keys carry the ``model.`` prefix, ``"openpi"`` if not."""
    keys = list(keys)
    if any(k.startswith("model." + _EXPERT) for k in keys):
        return "lerobot"
    if any(k.startswith(_EXPERT) for k in keys):
        return "openpi"
    raise ValueError(
        "checkpoint: no 'paligemma_with_expert.gemma_expert.' keys found; not a pi0/pi0.5 file"
    )


def pi05_to_policy_names(
    state: dict[str, Tensor], naming: str, whole: bool = False
) -> tuple[dict, list[str]]:
    """Rename a pi0.5 state dict to :class:`FlowMatchingPolicy` names, or (``whole``) to
    :class:`~ttt_gemma.paligemma.Pi05Policy` names (``prefix.paligemma.*`` for the VLM,
    ``policy.*`` for the rest).

    Returns:
        (renamed tensors, ignored keys). Keys that are neither mapped nor ignored raise ValueError.
    """
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {NAMINGS}, got {naming!r}")
    pre = "policy." if whole else ""
    out, ignored = {}, []
    for key, tensor in state.items():
        k = key
        if naming == "lerobot":
            if not k.startswith("model."):
                ignored.append(key)  # lerobot's normalisation buffers etc. live outside model.
                continue
            k = k[len("model.") :]
        if whole and k.startswith(_VLM):
            rest = k[len(_VLM) :]
            if rest.startswith(_VISION_FILE):  # transformers 4.x naming -> ours (5.x)
                rest = _VISION_OURS + rest[len(_VISION_FILE) :]
            out["prefix.paligemma." + rest] = tensor
        elif _IGNORED.match(k):
            ignored.append(key)
        elif k.startswith(_EXPERT + "model.layers.") or k.startswith(_EXPERT + "model.norm."):
            out[pre + "expert." + k[len(_EXPERT + "model.") :]] = tensor
        elif k.split(".")[0] in _HEAD_NAMES:
            out[pre + k] = tensor
        else:
            raise ValueError(f"checkpoint: unexpected key {key!r} ({naming} naming)")
    return out, ignored


def policy_to_pi05_names(model: torch.nn.Module, naming: str) -> dict[str, Tensor]:
    """Our state dict (without TTT parameters) under openpi or lerobot names (the inverse map).

    For a whole :class:`~ttt_gemma.paligemma.Pi05Policy` this is what openpi's
    ``safetensors.torch.save_model(PI0Pytorch)`` writes (pi0.5), so that its strict
    ``load_model`` accepts the file: the VLM (vision tower under transformers 4.x's
    ``vision_model.``), its token embedding once, as ``lm_head.weight`` (``save_model`` keeps the
    first name of a tied pair, and ``load_model`` rejects the second), and the expert's unused
    ``lm_head`` (zeros)."""
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {NAMINGS}, got {naming!r}")
    pre = "model." if naming == "lerobot" else ""
    out = {}
    for name, t in model.state_dict().items():
        if ".ttt." in name:
            continue
        if name.startswith("prefix.paligemma."):
            rest = name[len("prefix.paligemma.") :]
            if rest.startswith(_VISION_OURS):
                rest = _VISION_FILE + rest[len(_VISION_OURS) :]
            if rest == _EMBED:
                continue  # tied to lm_head.weight, written under that name
            out[pre + _VLM + rest] = t
            continue
        name = name.removeprefix("policy.")
        if name.startswith("expert."):
            out[pre + _EXPERT + "model." + name[len("expert.") :]] = t
        else:
            out[pre + name] = t
    if hasattr(model, "prefix"):
        head, emb = (
            model.prefix.paligemma.lm_head.weight,
            model.prefix.paligemma.model.language_model.embed_tokens.weight,
        )
        if head is not emb and not torch.equal(head, emb):
            raise ValueError(
                "save_pi05: the VLM's lm_head and embed_tokens differ; openpi ties them "
                "(one tensor in its files): tie them before saving"
            )
        vocab, width = model.prefix.config.vocab_size, model.policy.config.width
        out[pre + _EXPERT + "lm_head.weight"] = head.new_zeros(vocab, width)
    return out


def load_pi05(policy: torch.nn.Module, path: str | os.PathLike, naming: str = "auto") -> LoadReport:
    """Load a pi0.5 checkpoint (openpi's or lerobot's ``model.safetensors``) into ``policy``.

    A :class:`FlowMatchingPolicy` takes the action expert and the heads (the VLM's tensors are
    ignored); a :class:`~ttt_gemma.paligemma.Pi05Policy` takes the whole checkpoint, VLM
    included. Strict about everything but the TTT branches: a missing or mis-shaped parameter,
    or an unused expert/head/VLM tensor in the file (e.g. a layer the config does not have),
    raises ValueError, and nothing is copied unless everything fits.

    Args:
        policy: the target (its config must match the checkpoint's sizes).
        path: a ``model.safetensors`` file.
        naming: ``"openpi"``, ``"lerobot"`` or ``"auto"`` (detected from the keys).
    """
    state = _read_safetensors(path)
    if naming == "auto":
        naming = detect_naming(state)
    whole = hasattr(policy, "prefix")  # a Pi05Policy
    mapped, ignored = pi05_to_policy_names(state, naming, whole)
    tied, embed = "prefix.paligemma.lm_head.weight", "prefix.paligemma." + _EMBED
    # the VLM's lm_head is its token embedding (tied): openpi's files (safetensors' save_model)
    # hold it once as lm_head.weight, transformers' save_pretrained as embed_tokens.weight
    if whole and tied not in mapped and embed in mapped:
        mapped[tied] = mapped[embed]
    if whole and embed not in mapped and tied in mapped:
        mapped[embed] = mapped[tied]
    if (
        whole
        and tied in mapped
        and embed in mapped
        and not torch.equal(mapped[tied], mapped[embed])
    ):
        raise ValueError(
            f"checkpoint {os.fspath(path)!r}: the VLM's lm_head and embed_tokens differ (they are tied)"
        )
    ttt = [n for n in policy.state_dict() if ".ttt." in n]
    _check_then_copy(policy, mapped, f"checkpoint {os.fspath(path)!r} ({naming} naming)", ttt)
    return LoadReport(naming, sorted(mapped), ignored, ttt)


def _read_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a safetensors file; a corrupt or truncated file raises ValueError naming it."""
    try:
        return load_file(os.fspath(path))
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{os.fspath(path)!r} is not a readable safetensors file: {err}") from err


def check_tensors(
    own: dict[str, Tensor], tensors: dict[str, Tensor], source: str, may_miss=()
) -> None:
    """Check that ``tensors`` fit a module's state dict ``own``: every name except ``may_miss``
    present, nothing unexpected, every shape equal. Raises one ValueError naming ``source`` and the
    first mismatches (names, shapes)."""
    missing = sorted(set(own) - set(tensors) - set(may_miss))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the config: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    wrong = [f"{n}: file {tuple(t.shape)}, model {tuple(own[n].shape)}"
             for n, t in tensors.items() if t.shape != own[n].shape]  # fmt: skip
    if wrong:
        more = "..." if len(wrong) > 3 else ""
        raise ValueError(f"{source}: shape mismatch in {len(wrong)} tensor(s): {wrong[:3]}{more}")


def _check_then_copy(
    policy: torch.nn.Module, tensors: dict[str, Tensor], source: str, may_miss=()
) -> None:
    """Copy ``tensors`` into ``policy`` by name after checking them all (:func:`check_tensors`):
    a file that does not fit raises ValueError naming ``source`` before anything is written, so a
    failed load leaves the policy unchanged."""
    own = policy.state_dict()
    check_tensors(own, tensors, source, may_miss)
    with torch.no_grad():
        for name, t in tensors.items():
            own[name].copy_(t)


def _atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict | None = None) -> None:
    """``save_file`` through ``ttt_core.runfiles.atomic_path``: readers see the old file or the
    whole new one (temp file fsynced, renamed, folder fsynced; removed on any error)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata)


def save_pi05(policy: torch.nn.Module, path: str | os.PathLike, naming: str = "openpi") -> None:
    """Write the non-TTT weights of a :class:`FlowMatchingPolicy` (expert + heads) or of a whole
    :class:`~ttt_gemma.paligemma.Pi05Policy` in openpi or lerobot naming (atomically)."""
    _atomic_save(policy_to_pi05_names(policy, naming), Path(path))


def save_checkpoint(policy: torch.nn.Module | dict[str, Tensor], path: str | os.PathLike) -> None:
    """Write a whole policy (TTT included; or its state dict) in our naming, atomically (tmp file +
    os.replace)."""
    state = policy if isinstance(policy, dict) else policy.state_dict()
    out, storages = {}, set()
    for name, t in state.items():  # tied tensors (the VLM's lm_head = embed_tokens) as copies
        storage = t.untyped_storage().data_ptr()
        out[name] = t.clone() if storage in storages else t
        storages.add(storage)
    _atomic_save(out, Path(path), {"format": "ttt_gemma"})


def load_checkpoint(policy: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a :func:`save_checkpoint` file strictly (bit-identical tensors in the policy's dtype).

    Every tensor is checked (names and shapes) before the first is copied: a file that does not fit
    raises ValueError naming it and leaves the policy unchanged."""
    _check_then_copy(policy, _read_safetensors(path), f"checkpoint {os.fspath(path)!r}")
