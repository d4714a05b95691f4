"""Audio to training shards: WAV files (+ optional word-aligned transcripts) -> Mimi-code shards.

``ttt-moshi encode --mimi-weights mimi.safetensors --out train.npz a.wav b.wav``

Each WAV (PCM 16/24/32-bit, at Mimi's 24 kHz; resample first, e.g. ``ffmpeg -ar 24000``) becomes
one recording ``codes`` [1 + C * n, T] in Moshi's layout: codebook 0 the text stream, then ``n``
Mimi codebooks per channel (a stereo file, as moshi-finetune's: the left channel is Moshi's voice,
the right the user's, so Moshi 7B's 16 audio codebooks are 8 + 8). T = the Mimi frames (12.5 Hz);
recordings of different lengths are cut to the shortest in one shard (write one shard per file to
keep every frame). Mimi is moshi's own model (`moshi.models.loaders.get_mimi`), its weights read
from a local ``.safetensors`` file (never unpickled).

The text stream without a transcript is the text padding id at every step. A transcript is JSON
in moshi-finetune's form, ``{"alignments": [[word, [start_s, end_s]], ...]}``, tokenized with a
local SentencePiece model: a word's tokens are written from the frame of its start time on (later
if the previous word's tokens still run), the frame before a word gets the end-of-padding id, and
every other frame the padding id. A word may start up to one frame past the last frame (alignments
round): it goes to the last frame; a word starting later is an error (the transcript of another
file?). Recordings cut to the shortest lose more than a frame: a warning names the file and seconds.
"""

from __future__ import annotations

import json
import logging
import os
import wave
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel

from ttt_core.runfiles import reading

from .data import save_shard

__all__ = ["encode_wavs", "load_mimi", "read_wav", "text_stream"]

log = logging.getLogger(__name__)


def load_mimi(
    weights: str | os.PathLike | None,
    config: dict[str, Any] | None = None,
    num_codebooks: int = 8,
) -> MimiModel:
    """moshi's Mimi (``get_mimi``) with ``num_codebooks`` codebooks, weights from a local
    ``.safetensors`` file (``None``: random init, for tests); ``config`` defaults to moshi's."""
    total = int((config or loaders._mimi_config)["quantizer"]["n_q"])
    if not 1 <= num_codebooks <= total:
        raise ValueError(f"num_codebooks must be in 1..{total} (the Mimi's), got {num_codebooks}")
    if weights is not None:
        weights = Path(weights)
        if weights.suffix != ".safetensors":
            raise ValueError(f"mimi weights must be a .safetensors file, got {weights.name!r}")
        with reading(weights, "mimi weights file"):
            return loaders.get_mimi(str(weights), config, num_codebooks=num_codebooks)
    return loaders.get_mimi(None, config, num_codebooks=num_codebooks)


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """``(audio [C, N] float32 in [-1, 1], sample rate)`` of a PCM WAV file."""
    path = Path(path)
    with reading(path, "wav file"), wave.open(str(path), "rb") as w:
        width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
        raw = w.readframes(w.getnframes())
    if width == 3:  # 24-bit: widen to 32-bit
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        raw = np.concatenate([np.zeros((len(b), 1), np.uint8), b], axis=1).tobytes()
        width = 4
    if width not in (2, 4):
        raise ValueError(f"wav file {str(path)!r}: {8 * width}-bit samples; use 16/24/32-bit PCM")
    x = np.frombuffer(raw, np.int16 if width == 2 else np.int32).astype(np.float32)
    x /= float(2 ** (8 * width - 1))
    return x.reshape(-1, channels).T.copy(), rate


def text_stream(
    num_frames: int,
    frame_rate: float,
    padding_id: int,
    end_padding_id: int,
    alignments: Sequence[Sequence[Any]] = (),
    tokenize: Any = None,
) -> np.ndarray:
    """The text codebook [num_frames] for word alignments ``[[word, [start_s, end_s]], ...]``.

    A word starting in the frame just after the last (``num_frames``: a rounded alignment at the
    audio's end) is written from the last frame; one starting later raises ValueError.
    """
    out = np.full(num_frames, padding_id, dtype=np.int64)
    if alignments and tokenize is None:
        raise ValueError("alignments need a tokenizer")
    free = 0  # first frame not taken by a word's tokens
    for i, item in enumerate(alignments):
        try:
            word, (start, _end) = item[0], item[1]
            start = float(start)
        except (TypeError, ValueError, IndexError):
            raise ValueError(
                f"alignments[{i}] must be [word, [start_s, end_s]], got {item!r}"
            ) from None
        first = int(start * frame_rate)
        if first >= num_frames:
            if first > num_frames or num_frames == 0:
                raise ValueError(
                    f"alignments[{i}] ({str(word)!r}) starts at {start:g} s, past the end of the "
                    f"audio ({num_frames} frames = {num_frames / frame_rate:g} s): is it the "
                    "transcript of another file?"
                )
            first = num_frames - 1  # within one frame of the end: the last frame
        frame = max(first, free)
        if free <= frame - 1 and out[frame - 1] == padding_id:  # a padding frame before it
            out[frame - 1] = end_padding_id
        for token in tokenize(str(word)):
            if frame >= num_frames:
                break
            out[frame] = token
            frame += 1
        free = frame
    return out


def encode_wavs(
    wavs: Sequence[str | os.PathLike],
    mimi: MimiModel,
    out: str | os.PathLike,
    *,
    transcripts: Sequence[str | os.PathLike | None] | None = None,
    tokenizer: str | os.PathLike | None = None,
    padding_id: int = 3,
    end_padding_id: int = 0,
) -> Path:
    """Encode WAV files into one shard ``out`` (.npz / .safetensors) of codes [N, 1 + C*n, T].

    Args:
        wavs: PCM WAV files at ``mimi.sample_rate``, all with the same number of channels C.
        mimi: a Mimi model (`load_mimi`); its ``num_codebooks`` is n per channel.
        transcripts: one alignment JSON (or None) per WAV; needs ``tokenizer``.
        tokenizer: a SentencePiece ``.model`` file for the transcripts.
        padding_id, end_padding_id: the LM's text padding ids (Moshi 7B: 3 and 0).
    """
    if isinstance(wavs, (str, os.PathLike)) or not wavs:
        raise ValueError("wavs must be a non-empty list of WAV files")
    transcripts = list(transcripts) if transcripts is not None else [None] * len(wavs)
    if len(transcripts) != len(wavs):
        raise ValueError(f"got {len(transcripts)} transcripts for {len(wavs)} wav files")
    tokenize = None
    if any(t is not None for t in transcripts):
        if tokenizer is None:
            raise ValueError("transcripts need --tokenizer (a SentencePiece .model file)")
        import sentencepiece

        with reading(tokenizer, "tokenizer"):
            sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
        tokenize = sp.encode
    recordings = []
    for wav, transcript in zip(wavs, transcripts):
        audio, rate = read_wav(wav)  # (C, N)
        if rate != mimi.sample_rate:
            raise ValueError(
                f"wav file {str(wav)!r} is at {rate} Hz; Mimi reads {mimi.sample_rate} Hz "
                f"(resample it first, e.g. ffmpeg -i in.wav -ar {mimi.sample_rate} out.wav)"
            )
        with torch.no_grad():
            x = torch.from_numpy(audio)[:, None]  # (C, 1, N): each channel its own stream
            audio_codes = mimi.encode(x.to(next(mimi.parameters()).device)).cpu()  # (C, n, T)
        C, n, T = audio_codes.shape
        alignments = []
        if transcript is not None:
            with reading(transcript, "transcript"):
                data = json.loads(Path(transcript).read_text(encoding="utf-8"))
            if not isinstance(data, dict) or not isinstance(data.get("alignments"), list):
                raise ValueError(f"transcript {str(transcript)!r} of {str(wav)!r} must be a JSON "
                                 'object {"alignments": [[word, [start_s, end_s]], ...]}')  # fmt: skip
            alignments = data["alignments"]
        try:
            text = text_stream(T, mimi.frame_rate, padding_id, end_padding_id, alignments, tokenize)
        except ValueError as e:
            raise ValueError(f"transcript {str(transcript)!r} of {str(wav)!r}: {e}") from None
        codes = np.concatenate([text[None], audio_codes.reshape(C * n, T).numpy()], axis=0)
        recordings.append(codes.astype(np.int64))
    if len({r.shape[0] for r in recordings}) != 1:
        raise ValueError("all wav files of one shard must have the same number of channels")
    lengths = [r.shape[1] for r in recordings]
    T = min(lengths)
    shortest = wavs[lengths.index(T)]
    for wav, length in zip(wavs, lengths):
        if length - T > 1:  # a frame or less: rounding of lengths that are the same
            log.warning(
                "encode: cut %r to the shortest recording of the shard (%r): %d frames = %.2f s "
                "dropped (write one shard per file to keep every frame)",
                str(wav), str(shortest), length - T, (length - T) / mimi.frame_rate,
            )  # fmt: skip
    return save_shard(out, np.stack([r[:, :T] for r in recordings]))


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="ttt-moshi encode", description=__doc__.splitlines()[0])
    p.add_argument("wavs", nargs="+", help="PCM WAV files at 24 kHz")
    p.add_argument("--out", required=True, help="shard to write (.npz or .safetensors)")
    p.add_argument("--mimi-weights", required=True, help="Mimi weights (.safetensors)")
    p.add_argument("--mimi-config", help="JSON of get_mimi's config (default: moshi's Mimi)")
    p.add_argument("--num-codebooks", type=int, default=8, help="Mimi codebooks per channel")
    p.add_argument("--transcripts", nargs="+", help="alignment JSON per WAV (same order)")
    p.add_argument("--tokenizer", help="SentencePiece .model for the transcripts")
    p.add_argument("--padding-id", type=int, default=3)
    p.add_argument("--end-padding-id", type=int, default=0)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    try:
        config = None
        if args.mimi_config:
            with reading(args.mimi_config, "mimi config"):
                config = json.loads(Path(args.mimi_config).read_text(encoding="utf-8"))
        mimi = load_mimi(args.mimi_weights, config, args.num_codebooks)
        path = encode_wavs(
            args.wavs,
            mimi,
            args.out,
            transcripts=args.transcripts,
            tokenizer=args.tokenizer,
            padding_id=args.padding_id,
            end_padding_id=args.end_padding_id,
        )
    except Exception as e:
        if args.debug:
            raise
        print(f"ttt-moshi encode: error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(1) from None
    print(path)
