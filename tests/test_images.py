"""Image models: the pipeline as torchvision defines it, image predictions, bad images refused.

The pipeline's expected tensors are computed here independently, with NumPy and the formulas of
torchvision's transforms (resized size, crop offsets, zero padding, `/ 255`, `(x - mean) / std`).
"""

from __future__ import annotations

import io
import struct
import threading
import zlib
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service.preprocess.image import to_tensor
from service.preprocess.pipeline import ImagePipeline
from tests.conftest import AUTH, pt_bytes, reference_model, trained_state_dict, upload
from tests.helpers_api import assert_error
from tests.helpers_images import encoded, exif_rotated_jpeg

MNIST = {"mode": "L", "resize": 28, "center_crop": 28, "mean": [0.1307], "std": [0.3081]}


def _png(image: Image.Image, **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return buffer.getvalue()


def _picture(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A random 8-bit picture of `size` (width, height)."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4}.get(mode)
    shape = (size[1], size[0], channels) if channels else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def _expected(image: Image.Image, pipeline: dict[str, Any]) -> torch.Tensor:
    """torchvision's Compose([Resize, CenterCrop, ToTensor, Normalize]), computed by hand."""
    image = image.convert(pipeline["mode"])
    if "resize" in pipeline:
        size = pipeline["resize"]
        w, h = image.size
        if isinstance(size, int):
            new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        else:
            new_h, new_w = size
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float64)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if "center_crop" in pipeline:
        crop = pipeline["center_crop"]
        ch, cw = (crop, crop) if isinstance(crop, int) else crop
        h, w = pixels.shape[:2]
        pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
        pixels = np.pad(
            pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0))
        )
        h, w = pixels.shape[:2]
        top, left = round((h - ch) / 2), round((w - cw) / 2)
        pixels = pixels[top : top + ch, left : left + cw]
    x = pixels.transpose(2, 0, 1) / 255.0
    mean = np.array(pipeline["mean"])[:, None, None]
    std = np.array(pipeline["std"])[:, None, None]
    return torch.from_numpy((x - mean) / std).float()


PIPELINES = [
    pytest.param(
        {"mode": "RGB", "resize": 36, "center_crop": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2] * 3},
        (50, 40),
        "RGB",
        id="rgb-resize-short-side-and-crop",
    ),
    pytest.param(
        {"mode": "L", "resize": [20, 24], "mean": [0.5], "std": [0.25]},
        (31, 17),
        "RGB",
        id="rgb-to-grey-resize-hw",
    ),
    pytest.param(
        {"mode": "RGB", "center_crop": [12, 16], "mean": [0, 0, 0], "std": [1, 1, 1]},
        (9, 7),
        "RGB",
        id="crop-larger-than-image-pads",
    ),
    pytest.param(MNIST, (28, 28), "RGBA", id="rgba-to-grey-same-size"),
    pytest.param(MNIST, (40, 30), "CMYK", id="cmyk"),
]


@pytest.mark.parametrize(("pipeline", "size", "mode"), PIPELINES)
def test_the_pipeline_gives_torchvisions_tensor(
    pipeline: dict[str, Any], size: tuple[int, int], mode: str
) -> None:
    image = _picture(size, mode)
    got = to_tensor(ImagePipeline.model_validate(pipeline), image)
    want = _expected(image, pipeline)
    assert got.shape == want.shape
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# Through a real server.


@pytest.fixture
def digits(client: httpx.Client) -> dict[str, torch.Tensor]:
    r = client.post(
        "/v1/models",
        json={"name": "digits", "architecture": "mnist_cnn", "preprocess": {"image": MNIST}},
        headers=AUTH,
    )
    assert r.status_code == 201, r.text
    assert r.json()["preprocess"] == {"image": {**MNIST}}
    state = trained_state_dict("mnist_cnn")
    assert upload(client, "digits", pt_bytes(state)).status_code == 201
    return state


def test_an_image_is_answered_as_its_pipelines_tensor_would_be(
    client: httpx.Client, digits: dict[str, torch.Tensor]
) -> None:
    image = _picture((40, 30), "RGB", seed=3)
    x = _expected(image, MNIST)[None]
    want = reference_model("mnist_cnn", digits)(x).detach()
    r = client.post(
        "/v1/models/digits/predict", content=_png(image), headers={"Content-Type": "image/png"}
    )
    assert r.status_code == 200, r.text
    torch.testing.assert_close(torch.tensor(r.json()["outputs"]), want, rtol=1e-4, atol=1e-4)
    as_tensor = client.post("/v1/models/digits/predict", json={"inputs": x.tolist()})
    torch.testing.assert_close(
        torch.tensor(as_tensor.json()["outputs"]), want, rtol=1e-4, atol=1e-4
    )


def test_a_multipart_batch_is_answered_in_order_with_top_k(
    client: httpx.Client, digits: dict[str, torch.Tensor]
) -> None:
    images = [_picture((28 + i, 28), "L", seed=i) for i in range(3)]
    jpeg = io.BytesIO()
    images[2].save(jpeg, format="JPEG", quality=95)
    files = [
        ("a", ("a.png", _png(images[0]), "image/png")),
        ("b", ("b.png", _png(images[1], optimize=True), "image/png")),
        ("c", ("c.jpg", jpeg.getvalue(), "image/jpeg")),
    ]
    r = client.post("/v1/models/digits/predict?top_k=3", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["outputs"]) == 3
    decoded = [images[0], images[1], Image.open(io.BytesIO(jpeg.getvalue()))]
    x = torch.stack([_expected(image, MNIST) for image in decoded])
    want = reference_model("mnist_cnn", digits)(x).detach()
    torch.testing.assert_close(torch.tensor(body["outputs"]), want, rtol=1e-4, atol=1e-4)
    for row, probabilities, prediction in zip(
        body["top_k"], body["probabilities"], body["predictions"], strict=True
    ):
        assert len(row) == 3
        assert row[0]["index"] == prediction
        assert row[0]["label"] == str(prediction)
        ranked = sorted(range(10), key=lambda i: -probabilities[i])[:3]
        assert [entry["index"] for entry in row] == ranked
        assert [entry["probability"] for entry in row] == [probabilities[i] for i in ranked]


def _bomb_png(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header says `width` x `height` (correct CRC): a few dozen bytes."""
    data = bytearray(_png(Image.new("L", (1, 1))))
    ihdr = bytearray(data[12:29])  # type + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def _animated_png() -> bytes:
    frames = [_picture((28, 28), "L", seed=i) for i in range(2)]
    return _png(frames[0], save_all=True, append_images=frames[1:])


def _gif() -> bytes:
    buffer = io.BytesIO()
    _picture((28, 28), "L").save(buffer, format="GIF")
    return buffer.getvalue()


def _sixteen_bit() -> bytes:
    return _png(Image.fromarray(np.full((28, 28), 40000, dtype=np.uint16)))


BAD = [
    pytest.param(lambda: _png(_picture((28, 28), "L"))[:60], 422, "bad_image", id="truncated"),
    pytest.param(lambda: b"this is not an image at all", 422, "bad_image", id="not-an-image"),
    pytest.param(_gif, 415, "unsupported_image_format", id="gif"),
    pytest.param(_animated_png, 422, "animated_image", id="animated"),
    pytest.param(_sixteen_bit, 422, "unsupported_image_mode", id="16-bit"),
    pytest.param(lambda: _bomb_png(50_000, 50_000), 413, "image_too_large", id="bomb"),
    # Within the pixel limit, but Resize(28) of its short side would make it 28 x 5.6 million.
    pytest.param(
        lambda: _png(_picture((1, 200_000), "L")), 413, "image_too_large", id="aspect-bomb"
    ),
    pytest.param(lambda: _png(_picture((20, 20), "L")), 200, None, id="small-is-resized"),
]


def _palette() -> bytes:
    return _png(_picture((30, 40), "RGB").convert("P", palette=Image.Palette.ADAPTIVE))


CONVERTED = [
    pytest.param(_palette, "image/png", id="palette"),
    pytest.param(lambda: _png(_picture((28, 28), "RGBA")), "image/png", id="alpha"),
    pytest.param(lambda: encoded(_picture((40, 30), "CMYK"), "JPEG"), "image/jpeg", id="cmyk"),
    pytest.param(lambda: encoded(_picture((36, 30)), "WEBP"), "image/webp", id="webp"),
    pytest.param(lambda: exif_rotated_jpeg(_picture((40, 30))), "image/jpeg", id="exif"),
]


@pytest.mark.parametrize(("make", "media_type"), CONVERTED)
def test_palette_alpha_cmyk_and_exif_images_are_converted_as_documented(
    client: httpx.Client, digits: dict[str, torch.Tensor], make: Any, media_type: str
) -> None:
    """Converted to the pipeline's mode from the decoded pixels, EXIF orientation not applied
    (as torchvision's loaders): what training sees of the same file (test_image_datasets)."""
    data = make()
    decoded = Image.open(io.BytesIO(data))
    x = _expected(decoded, MNIST)[None]
    model = reference_model("mnist_cnn", digits)
    r = client.post("/v1/models/digits/predict", content=data, headers={"Content-Type": media_type})
    assert r.status_code == 200, r.text
    got = torch.tensor(r.json()["outputs"])
    torch.testing.assert_close(got, model(x).detach(), rtol=1e-4, atol=1e-4)
    if decoded.getexif().get(0x0112) == 6:  # the upright picture would be another input
        upright = _expected(decoded.transpose(Image.Transpose.ROTATE_270), MNIST)[None]
        assert not torch.allclose(got, model(upright).detach(), rtol=1e-4, atol=1e-4)


def test_bad_images_and_bombs_do_not_stall_other_requests(
    client: httpx.Client, digits: dict[str, torch.Tensor]
) -> None:
    """Three clients send bombs and broken files without pause; a fourth's predictions still
    answer (a bomb decoded in full would take minutes and gigabytes: a stall is not subtle)."""
    bad = [
        _bomb_png(50_000, 50_000),
        _png(_picture((1, 200_000), "L")),
        _png(_picture((28, 28), "L"))[:60],
        b"not an image",
    ]
    stop = threading.Event()
    codes: list[int] = []

    def attack() -> None:
        with httpx.Client(base_url=client.base_url, timeout=60) as c:
            while not stop.is_set():
                for body in bad:
                    answer = c.post(
                        "/v1/models/digits/predict",
                        content=body,
                        headers={"Content-Type": "image/png"},
                    )
                    codes.append(answer.status_code)

    attackers = [threading.Thread(target=attack) for _ in range(3)]
    for t in attackers:
        t.start()
    try:
        good = _png(_picture((28, 28), "L", seed=5))
        with httpx.Client(base_url=client.base_url, timeout=10) as c:
            for _ in range(20):
                r = c.post(
                    "/v1/models/digits/predict", content=good, headers={"Content-Type": "image/png"}
                )
                assert r.status_code == 200, r.text
                r = c.post("/v1/models/digits/predict", json={"inputs": [[[0.5] * 28] * 28]})
                assert r.status_code == 200, r.text
    finally:
        stop.set()
        for t in attackers:
            t.join(timeout=60)
    assert len(codes) >= len(bad)
    assert set(codes) <= {413, 422}, sorted(set(codes))


@pytest.mark.parametrize(("make", "status", "code"), BAD)
def test_bad_images_get_a_clear_4xx_and_the_model_keeps_serving(
    client: httpx.Client, digits: dict[str, torch.Tensor], make: Any, status: int, code: str | None
) -> None:
    r = client.post(
        "/v1/models/digits/predict", content=make(), headers={"Content-Type": "image/png"}
    )
    if code is None:
        assert r.status_code == status, r.text
    else:
        assert_error(r, status, code)
    good = client.post(
        "/v1/models/digits/predict",
        content=_png(_picture((28, 28), "L")),
        headers={"Content-Type": "image/png"},
    )
    assert good.status_code == 200


def test_images_are_refused_by_a_tensor_model_and_bad_pipelines_at_creation(
    client: httpx.Client,
) -> None:
    client.post("/v1/models", json={"name": "vec", "architecture": "mlp_bn"}, headers=AUTH)
    assert upload(client, "vec", pt_bytes(trained_state_dict("mlp_bn"))).status_code == 201
    r = client.post(
        "/v1/models/vec/predict",
        content=_png(_picture((2, 1), "L")),
        headers={"Content-Type": "image/png"},
    )
    assert_error(r, 415, "images_not_accepted")
    wrong_size = {**MNIST, "center_crop": 32}
    r = client.post(
        "/v1/models",
        json={"name": "bad", "architecture": "mnist_cnn", "preprocess": {"image": wrong_size}},
        headers=AUTH,
    )
    body = assert_error(r, 422, "invalid_preprocess")
    assert "[1, 32, 32]" in body["detail"]
    assert "[1, 28, 28]" in body["detail"]
    r = client.post(
        "/v1/models",
        json={
            "name": "bad",
            "architecture": "mnist_cnn",
            "preprocess": {"image": {**MNIST, "mean": [0.1, 0.2]}},
        },
        headers=AUTH,
    )
    assert r.status_code == 422
    assert client.get("/v1/models/bad").status_code == 404
