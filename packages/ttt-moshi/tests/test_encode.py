"""``ttt-moshi encode``: generated audio through a small random-init moshi Mimi into shards that
the loader reads and the trainer trains on."""

from __future__ import annotations

import copy
import json
import logging
import math
import wave

import numpy as np
import pytest
import torch
from conftest import TINY_KWARGS
from moshi.models import loaders
from safetensors.torch import save_file

from ttt_moshi import FinetuneConfig, TokenShards, Trainer, load_shard
from ttt_moshi.cli import main as cli_main
from ttt_moshi.encode import load_mimi, text_stream

SR = 24000


def _small_mimi_config() -> dict:
    cfg = copy.deepcopy(loaders._mimi_config)  # moshi's Mimi, narrowed
    cfg["seanet"].update(dimension=32, n_filters=4)
    cfg["transformer"].update(
        d_model=32, num_heads=2, num_layers=1, dim_feedforward=64, context=25,
        input_dimension=32, output_dimensions=[32],
    )  # fmt: skip
    cfg["quantizer"].update(dimension=8, n_q=4, bins=32, input_dimension=32, output_dimension=32)
    return cfg


def _write_wav(path, audio: np.ndarray, rate: int = SR) -> None:
    """audio [C, N] in [-1, 1] as 16-bit PCM."""
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").T.copy()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(audio.shape[0])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def _tone(seconds: float, channels: int, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(seed)
    f = rng.uniform(120, 400, size=(channels, 1))
    return 0.4 * np.sin(2 * np.pi * f * t * (1 + 0.3 * t)) + 0.02 * rng.standard_normal(
        (channels, len(t))
    )


@pytest.fixture
def mimi_files(tmp_path):
    cfg = _small_mimi_config()
    torch.manual_seed(0)
    mimi = loaders.get_mimi(None, cfg, num_codebooks=2)
    weights = tmp_path / "mimi.safetensors"
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, str(weights))
    (tmp_path / "mimi.json").write_text(json.dumps(cfg))
    return weights, tmp_path / "mimi.json", cfg


def _train_tokenizer(tmp_path) -> str:
    """A small SentencePiece model (``tok.model``) knowing the test transcripts' words."""
    import sentencepiece

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["hello there general kenobi", "the quick brown fox"] * 50))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "tok"), vocab_size=24,
        minloglevel=2, user_defined_symbols=[],
    )  # fmt: skip
    return str(tmp_path / "tok.model")


def test_encode_writes_shards_that_load_and_train(tmp_path, mimi_files, caplog):
    weights, cfg_path, cfg = mimi_files
    wavs = [tmp_path / f"a{i}.wav" for i in range(2)]
    for i, w in enumerate(wavs):
        _write_wav(w, _tone(3.3 + i, channels=1, seed=i))
    out = tmp_path / "train.npz"
    with caplog.at_level(logging.WARNING, logger="ttt_moshi.encode"):
        cli_main([
            "encode", *map(str, wavs), "--out", str(out), "--mimi-weights", str(weights),
            "--mimi-config", str(cfg_path), "--num-codebooks", "2",
        ])  # fmt: skip
    codes = load_shard(out)  # (N, 1 + 2, T)
    assert codes.shape == (2, 3, math.ceil(3.3 * 12.5))  # the shorter file's frames (padded)
    # the longer file is cut (54 -> 42 frames): one warning naming it and the seconds dropped
    [cut] = [r.getMessage() for r in caplog.records]
    assert "a1.wav" in cut and "12 frames = 0.96 s dropped" in cut and "a0.wav" in cut
    assert (codes[:, 0] == 3).all()  # no transcript: the text padding id
    mimi = load_mimi(weights, cfg, num_codebooks=2)
    from ttt_moshi.encode import read_wav

    audio, _ = read_wav(wavs[0])
    with torch.no_grad():  # the same codes as moshi's Mimi on the file's samples
        ref = mimi.encode(torch.from_numpy(audio)[None])[0].numpy()
    np.testing.assert_array_equal(codes[0, 1:], ref[:, : codes.shape[2]])
    shards = TokenShards([out], num_codebooks=3, card=32, text_card=40, seq_len=20)
    assert len(shards) == 4
    run = {
        "run_dir": str(tmp_path / "run"), "data": {"train_data": [str(out)]},
        "duration_sec": 1.6, "batch_size": 2, "max_steps": 3, "optim": {"pct_start": 0.4},
        "model": {"lm_kwargs": TINY_KWARGS}, "ttt": {"layers": [1], "config": {"mini_batch_size": 4}},
    }  # fmt: skip
    hist = Trainer(FinetuneConfig.from_dict(run), progress=False).fit()
    assert len(hist) == 3 and all(np.isfinite(r["loss"]) for r in hist)


def test_stereo_and_transcript(tmp_path, mimi_files):
    import sentencepiece

    weights, _, cfg = mimi_files
    _train_tokenizer(tmp_path)
    _write_wav(tmp_path / "s.wav", _tone(2.0, channels=2, seed=3))
    (tmp_path / "s.json").write_text(
        json.dumps(
            {"alignments": [["hello", [0.2, 0.5]], ["there", [0.3, 0.6]], ["fox", [1.2, 1.4]]]}
        )
    )
    from ttt_moshi.encode import encode_wavs

    out = encode_wavs(
        [tmp_path / "s.wav"], load_mimi(weights, cfg, 2), tmp_path / "s.safetensors",
        transcripts=[tmp_path / "s.json"], tokenizer=tmp_path / "tok.model",
    )  # fmt: skip
    codes = load_shard(out)[0]
    assert codes.shape == (1 + 2 * 2, 25)  # text + 2 codebooks per channel
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    hello, there, fox = (sp.encode(w) for w in ("hello", "there", "fox"))
    expected = np.full(25, 3)
    expected[1] = 0  # end of padding before the first word (frame 2 = 0.2 s * 12.5)
    at = 2
    for tokens in (hello, there):  # "there" starts at 0.3 s, after hello's tokens
        expected[at : at + len(tokens)] = tokens
        at += len(tokens)
    expected[14] = 0
    expected[15 : 15 + len(fox)] = fox
    np.testing.assert_array_equal(codes[0], expected)


def test_encode_errors_name_the_file(tmp_path, mimi_files, capsys):
    weights, cfg_path, _ = mimi_files
    _write_wav(tmp_path / "slow.wav", _tone(1.0, 1, 0)[:, ::2], rate=12000)
    with pytest.raises(SystemExit):
        cli_main([
            "encode", str(tmp_path / "slow.wav"), "--out", str(tmp_path / "x.npz"),
            "--mimi-weights", str(weights), "--mimi-config", str(cfg_path), "--num-codebooks", "2",
        ])  # fmt: skip
    err = capsys.readouterr().err
    assert "slow.wav' is at 12000 Hz" in err and "-ar 24000" in err and len(err.splitlines()) == 1
    (tmp_path / "bad.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"must be a \.safetensors file"):
        load_mimi(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"num_codebooks must be in 1\.\.4"):
        load_mimi(weights, json.loads(cfg_path.read_text()), num_codebooks=8)
    with pytest.raises(ValueError, match="alignments need a tokenizer"):
        text_stream(10, 12.5, 3, 0, [["a", [0, 1]]])


def test_word_at_the_end_goes_to_the_last_frame_and_a_later_one_is_refused():
    tokenize = lambda word: [5, 6]
    # 0.8 s * 12.5 Hz = frame 10 of 10 (0..9): a rounded alignment at the end -> the last frame
    text = text_stream(10, 12.5, 3, 0, [["end", [0.8, 0.85]]], tokenize)
    np.testing.assert_array_equal(text, [3] * 8 + [0, 5])
    late = r"alignments\[1\] \('late'\) starts at 0\.9 s, past the end of the audio \(10 frames"
    with pytest.raises(ValueError, match=late):
        text_stream(10, 12.5, 3, 0, [["a", [0.0, 0.1]], ["late", [0.9, 1.0]]], tokenize)


def _encode_with_transcript(tmp_path, weights, cfg_path):
    """``ttt-moshi encode a.wav --transcripts a.json`` in tmp_path (2 codebooks, a fresh
    tokenizer)."""
    cli_main([
        "encode", str(tmp_path / "a.wav"), "--out", str(tmp_path / "a.npz"),
        "--mimi-weights", str(weights), "--mimi-config", str(cfg_path), "--num-codebooks", "2",
        "--transcripts", str(tmp_path / "a.json"), "--tokenizer", _train_tokenizer(tmp_path),
    ])  # fmt: skip


def test_transcript_of_another_file_names_it(tmp_path, mimi_files, capsys):
    weights, cfg_path, _ = mimi_files
    _write_wav(tmp_path / "a.wav", _tone(1.0, 1, 0))  # 13 frames
    (tmp_path / "a.json").write_text(
        json.dumps({"alignments": [["hello", [0.2, 0.4]], ["there", [5.0, 5.3]]]})
    )
    with pytest.raises(SystemExit):
        _encode_with_transcript(tmp_path, weights, cfg_path)
    err = capsys.readouterr().err.strip()
    assert err.startswith("ttt-moshi encode: error: transcript '") and len(err.splitlines()) == 1
    assert "a.json' of '" in err and "alignments[1] ('there') starts at 5 s" in err
    assert "(13 frames = 1.04 s)" in err and not (tmp_path / "a.npz").exists()


def test_transcript_without_alignments_names_it(tmp_path, mimi_files, capsys):
    weights, cfg_path, _ = mimi_files
    _write_wav(tmp_path / "a.wav", _tone(1.0, 1, 0))
    (tmp_path / "a.json").write_text(json.dumps({"words": []}))  # not moshi-finetune's form
    with pytest.raises(SystemExit):
        _encode_with_transcript(tmp_path, weights, cfg_path)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a.json' of '" in err and '{"alignments":' in err
