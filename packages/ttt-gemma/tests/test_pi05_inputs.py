"""The whole policy's observation from LeRobot frames against openpi's own construction, written
out here independently: ``image_tools.resize_with_pad`` (PIL, bilinear) + ``/ 255 * 2 - 1``, and
``PaligemmaTokenizer.tokenize(prompt, state)`` (pi0.5's discretised state, BOS, right padding)."""

import numpy as np
import pytest
import torch
from PIL import Image

from ttt_gemma.lerobot import read_lerobot, write_lerobot
from ttt_gemma.paligemma import preprocess_images, state_prompt
from ttt_gemma.pi05_inputs import IMAGE_SLOTS, Pi05Observations
from ttt_gemma.word_tokenizer import build_word_tokenizer, load_tokenizer


def openpi_resize_with_pad(image: np.ndarray, size: int) -> np.ndarray:
    """openpi's ``_resize_with_pad_pil`` on one [H, W, 3] uint8 image, then its [-1, 1] scaling."""
    pil = Image.fromarray(image)
    cur_w, cur_h = pil.size
    if (cur_w, cur_h) != (size, size):
        ratio = max(cur_w / size, cur_h / size)
        rh, rw = int(cur_h / ratio), int(cur_w / ratio)
        resized = pil.resize((rw, rh), resample=Image.BILINEAR)
        canvas = Image.new(resized.mode, (size, size), 0)
        canvas.paste(resized, (max(0, (size - rw) // 2), max(0, (size - rh) // 2)))
        pil = canvas
    return np.asarray(pil).astype(np.float64) / 255.0 * 2.0 - 1.0  # (size, size, 3)


@pytest.mark.parametrize("shape", [(37, 53), (61, 22), (28, 28)], ids=["wide", "tall", "as-is"])
def test_preprocessing_matches_openpi_resize_with_pad(shape):
    rng = np.random.default_rng(1)
    # a smooth image plus noise (bilinear resampling of pure noise is all rounding)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    smooth = 127 + 100 * np.sin(xx[..., None] / 5.0 + yy[..., None] / 7.0 + np.arange(3))
    image = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
    ours = preprocess_images(torch.from_numpy(image)[None], 28)[0].permute(1, 2, 0).double()
    ref = torch.from_numpy(openpi_resize_with_pad(image, 28))
    # openpi's box: int(H / ratio) x int(W / ratio) at ((28 - h) // 2, (28 - w) // 2); black outside
    ratio = max(shape[1] / 28, shape[0] / 28)
    h, w = int(shape[0] / ratio), int(shape[1] / ratio)
    box = torch.zeros(28, 28, dtype=torch.bool, device="cpu")  # beside ours (CPU images)
    box[(28 - h) // 2 : (28 - h) // 2 + h, (28 - w) // 2 : (28 - w) // 2 + w] = True
    assert torch.equal(ours[~box], torch.full_like(ours[~box], -1.0))
    assert (ours[box] > -1).any(-1).all()  # every pixel of the box is image (none is all black)
    # PIL's uint8 bilinear rounds to 1/255 (2/255 after scaling); the filters agree beyond that
    torch.testing.assert_close(ours, ref, rtol=0, atol=3 / 255)


def test_prompt_and_images_equal_openpis_for_a_fixed_state(tmp_path):
    rng = np.random.default_rng(2)
    episode = {
        "observation.state": np.array([[0.3, -2.0, 7.5]] * 5, dtype=np.float32),
        "action": rng.normal(size=(5, 2)).astype(np.float32),
        "cam_high": rng.integers(0, 256, size=(5, 30, 40, 3), dtype=np.uint8),
    }
    episode["observation.state"][1] = [1.1, -1.0, 4.0]  # a spread for the statistics
    episode["observation.state"][2] = [-0.4, 3.0, 9.0]
    root = write_lerobot(tmp_path / "ds", [episode], fps=10, image_keys=["cam_high"],
                         task="Fold_the towel\n")  # fmt: skip
    frames = read_lerobot(root, image_keys=["cam_high"], tasks=True)
    state_norm, _ = frames.normalizers("quantile")
    states = state_norm.normalize(frames.states)
    tok_dir = build_word_tokenizer(tmp_path / "tok", ["Fold the towel"])
    tokenizer = load_tokenizer(tok_dir)
    obs = Pi05Observations(frames, {"left_wrist_0_rgb": "cam_high"}, states, tokenizer, 16, 28)
    index = torch.tensor([0, 3])
    images, image_masks, tokens, token_masks = obs(index)

    # openpi: normalised state -> 256 bins over [-1, 1]; cleaned task; BOS; pad with 0 to max_len
    for row, i in enumerate(index.tolist()):
        state = states[i].numpy()
        bins = np.digitize(state, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1
        text = "Fold_the towel\n".strip().replace("_", " ").replace("\n", " ")
        prompt = f"Task: {text}, State: {' '.join(map(str, bins))};\nAction: "
        assert state_prompt(obs.tasks(index)[row], states[i].numpy()) == prompt
        ids = [
            tokenizer.convert_tokens_to_ids("<bos>"),
            *tokenizer.encode(prompt, add_special_tokens=False),
        ]
        want = ids + [0] * (16 - len(ids))
        assert tokens[row].tolist() == want
        assert token_masks[row].tolist() == [True] * len(ids) + [False] * (16 - len(ids))
        assert tokenizer.convert_ids_to_tokens(want[1:4]) == ["Task", ":", "Fold"]
    # the state in the prompt is the quantile-normalised one: 2 (x - q01) / (q99 - q01) - 1
    q01, q99 = (np.quantile(episode["observation.state"].astype(np.float64), q, axis=0)
                for q in (0.01, 0.99))  # fmt: skip
    expected = 2 * (episode["observation.state"][3] - q01) / (q99 - q01 + 1e-6) - 1
    np.testing.assert_allclose(states[3].numpy(), expected, rtol=0, atol=1e-5)

    # the camera is in its slot (openpi's resize), the other slots black and masked
    assert images.shape == (2, len(IMAGE_SLOTS), 3, 28, 28)
    assert image_masks.tolist() == [[False, True, False]] * 2
    for row, i in enumerate(index.tolist()):
        ref = openpi_resize_with_pad(episode["cam_high"][i], 28)
        torch.testing.assert_close(images[row, 1].permute(1, 2, 0).double(),
                                   torch.from_numpy(ref), rtol=0, atol=3 / 255)  # fmt: skip
    assert torch.equal(images[:, 0], torch.full((2, 3, 28, 28), -1.0))
    assert torch.equal(images[:, 2], torch.full((2, 3, 28, 28), -1.0))


def test_unknown_image_slot_is_refused(tmp_path):
    episode = {"observation.state": np.zeros((3, 1), np.float32),
               "action": np.zeros((3, 1), np.float32)}  # fmt: skip
    frames = read_lerobot(write_lerobot(tmp_path / "ds", [episode], fps=5), tasks=True)
    with pytest.raises(ValueError, match=r"unknown slots \['wrist'\]; pi0.5's are"):
        Pi05Observations(frames, {"wrist": "cam"}, frames.states, None, 8, 28)
