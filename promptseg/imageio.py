"""Turn user images and masks (paths, PIL images, numpy arrays, torch tensors) into CPU tensors.

Every model takes its inputs through these functions, so the accepted forms and the error
messages are the same everywhere. Images become RGB ``uint8 [3, H, W]``; binary masks become
``bool [H, W]``; multi-object label maps become ``int64 [H, W]``.

Masks and label maps are resized nearest, picking the source pixel ``PIL.Image.NEAREST`` picks
(`transforms.resize_mask(grid="center")`), so they match masks resized with PIL.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .transforms import resize_mask

__all__ = [
    "ImageInput",
    "MaskInput",
    "content_hash",
    "load_image",
    "load_label_map",
    "load_mask",
    "to_pil",
]

ImageInput = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor
MaskInput = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor

_IMAGE_FORMS = (
    "a path to an image file, a PIL.Image.Image, a numpy array HxW / HxWx1 / HxWx3 / HxWx4, "
    "or a torch tensor CxHxW (C in 1, 3, 4) / HxW; dtype uint8, or float with values in [0, 1]"
)
_MASK_FORMS = (
    "a path to a mask image (PNG), a PIL.Image.Image, or a numpy array / torch tensor of shape "
    "HxW, 1xHxW, HxWx1 or HxWx3 / HxWx4 (equal channels; an array of shape 1xNxC is read as "
    "1xHxW)"
)
_HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _describe(x: object) -> str:
    """Type, shape and dtype of `x`, for error messages."""
    if isinstance(x, (np.ndarray, torch.Tensor)):
        kind = "numpy.ndarray" if isinstance(x, np.ndarray) else "torch.Tensor"
        return f"{kind} of shape {tuple(x.shape)} and dtype {x.dtype}"
    if isinstance(x, Image.Image):
        return f"PIL image of mode {x.mode!r} and size {x.size}"
    return f"{type(x).__module__}.{type(x).__qualname__}"


def _open(path: str | os.PathLike, what: str) -> Image.Image:
    """Open and fully decode a file with PIL, honouring the EXIF orientation.

    ``.load()`` forces decoding so that a truncated or corrupt file fails here, with the path
    in the message, rather than somewhere deep inside a model.
    """
    path_str = os.fspath(path)
    if not os.path.exists(path_str):
        raise FileNotFoundError(f"{what} file not found: '{path_str}'")
    if os.path.isdir(path_str):
        raise ValueError(f"could not read {what} '{path_str}': it is a directory, not a file")
    try:
        with Image.open(path_str) as img:
            img.load()
            out = ImageOps.exif_transpose(img)
            if out is img:  # exif_transpose may return the same object; detach it from the file
                out = img.copy()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise ValueError(f"could not read {what} '{path_str}': {e}") from e
    except Image.DecompressionBombError as e:  # pragma: no cover - needs a huge file
        raise ValueError(f"could not read {what} '{path_str}': {e}") from e
    return out


def _check_nonempty(shape: tuple[int, ...], given: object, what: str) -> None:
    if any(s == 0 for s in shape):
        raise ValueError(f"{what} has zero size: got {_describe(given)}")


def _float_to_uint8(t: torch.Tensor, given: object) -> torch.Tensor:
    """Float image in [0, 1] -> uint8 in [0, 255] (rounded)."""
    t = t.float()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"float image contains NaN or infinite values: got {_describe(given)}")
    lo, hi = float(t.min()), float(t.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"float image values must be in [0, 1], got values in [{lo:g}, {hi:g}] "
            f"({_describe(given)}); if it is in 0..255, divide it by 255 "
            "(or convert it to uint8)"
        )
    return (t * 255.0).round_().to(torch.uint8)


def _pil_to_hwc_uint8(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> HxWx3 uint8 RGB. Alpha channels are dropped, not composited."""
    mode = img.mode
    if mode in _HIGH_BIT_MODES:
        # 16-bit grayscale (PNG decodes to "I;16" or "I"): scale 0..65535 to 0..255.
        a = np.asarray(img).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(
                f"PIL image of mode {mode!r} has values in [{a.min()}, {a.max()}]; "
                "integer images are read as 16-bit (0..65535)"
            )
        g = np.rint(a / 257.0).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "F":
        a = torch.from_numpy(np.array(img, dtype=np.float32))
        g = _float_to_uint8(a, img).numpy()
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "RGB":
        return np.asarray(img)
    if mode == "P":
        # Through RGBA so that palette transparency is understood (then dropped).
        img = img.convert("RGBA")
    try:
        rgb = img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(
            f"cannot convert a PIL image of mode {mode!r} to RGB: {e}; "
            "convert it yourself with image.convert('RGB')"
        ) from e
    return np.asarray(rgb)


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    """Copy a numpy array into a new contiguous tensor (the caller may mutate the array)."""
    return torch.from_numpy(np.array(a, copy=True, order="C"))


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------


def load_image(image: ImageInput) -> torch.Tensor:
    """RGB uint8 tensor [3, H, W] on CPU from any accepted image input.

    Accepted: a path to any PIL-readable file (EXIF orientation applied); a PIL image of any
    mode (alpha is dropped, not composited; 16-bit grayscale is scaled to 8 bits); a numpy
    array HxW / HxWx1 / HxWx3 / HxWx4; a torch tensor CxHxW (C in 1, 3, 4) or HxW. Arrays and
    tensors must be uint8, or float with values in [0, 1]. Gray images are repeated to 3
    channels and a 4th (alpha) channel is dropped. Bool arrays are rejected: they are masks.
    """
    if isinstance(image, (str, os.PathLike)):
        img = _open(image, "image")
        _check_nonempty((img.height, img.width), img, "image")
        return _as_tensor(_pil_to_hwc_uint8(img)).permute(2, 0, 1).contiguous()

    if isinstance(image, Image.Image):
        _check_nonempty((image.height, image.width), image, "image")
        return _as_tensor(_pil_to_hwc_uint8(image)).permute(2, 0, 1).contiguous()

    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image_hwc = image[..., None]
        elif image.ndim == 3 and image.shape[2] in (1, 3, 4):
            image_hwc = image
        elif image.ndim == 3 and image.shape[0] in (1, 3, 4):
            raise ValueError(
                f"numpy images are channels-last (HxWxC), got {_describe(image)}; "
                f"transpose it with np.transpose(a, (1, 2, 0)). Accepted: {_IMAGE_FORMS}"
            )
        else:
            raise ValueError(
                f"unsupported image shape: got {_describe(image)}. Accepted: {_IMAGE_FORMS}"
            )
        t = _tensor_from_array(image_hwc, image).permute(2, 0, 1)
        return _chw_to_rgb_uint8(t, image)

    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 2:
            t = t[None]
        elif t.ndim == 3 and t.shape[0] in (1, 3, 4):
            pass
        elif t.ndim == 3 and t.shape[2] in (1, 3, 4):
            raise ValueError(
                f"torch images are channels-first (CxHxW), got {_describe(image)}; "
                f"use t.permute(2, 0, 1). Accepted: {_IMAGE_FORMS}"
            )
        elif t.ndim == 4 and t.shape[0] == 1:
            raise ValueError(
                f"expected a single image, got a batch: {_describe(image)}; pass image[0]. "
                f"Accepted: {_IMAGE_FORMS}"
            )
        else:
            raise ValueError(
                f"unsupported image shape: got {_describe(image)}. Accepted: {_IMAGE_FORMS}"
            )
        if t.dtype == torch.bool:
            raise ValueError(_bool_image_message(image))
        return _chw_to_rgb_uint8(t, image)

    raise TypeError(f"unsupported image type: got {_describe(image)}. Accepted: {_IMAGE_FORMS}")


def _bool_image_message(given: object) -> str:
    return (
        f"got a boolean {_describe(given)}: that is a mask, not an image; use load_mask() for "
        "masks, or convert it to uint8 (x * 255) if you really mean a black-and-white image"
    )


def _tensor_from_array(a: np.ndarray, given: object) -> torch.Tensor:
    """numpy image array -> tensor, rejecting dtypes other than uint8 / float."""
    if a.dtype == np.bool_:
        raise ValueError(_bool_image_message(given))
    if a.dtype != np.uint8 and not np.issubdtype(a.dtype, np.floating):
        raise TypeError(
            f"unsupported image dtype: got {_describe(given)}; accepted dtypes are uint8 "
            "(0..255) and float (0..1); convert with a.astype(np.uint8) if values are 0..255"
        )
    if a.dtype not in (np.float16, np.float32, np.float64, np.uint8):
        a = a.astype(np.float64)  # e.g. float128
    return _as_tensor(a)


def _chw_to_rgb_uint8(t: torch.Tensor, given: object) -> torch.Tensor:
    """CxHxW (C in 1, 3, 4) uint8 / float tensor -> contiguous uint8 [3, H, W]."""
    _check_nonempty(tuple(t.shape), given, "image")
    if t.dtype == torch.uint8:
        pass
    elif t.is_floating_point():
        t = _float_to_uint8(t, given)
    else:
        raise TypeError(
            f"unsupported image dtype: got {_describe(given)}; accepted dtypes are uint8 "
            "(0..255) and float (0..1); convert with t.to(torch.uint8) if values are 0..255"
        )
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    elif t.shape[0] == 4:
        t = t[:3]  # alpha dropped, not composited
    return t.contiguous()


def to_pil(image: torch.Tensor) -> Image.Image:
    """uint8 tensor [3, H, W] -> RGB PIL image."""
    if (
        not isinstance(image, torch.Tensor)
        or image.dtype != torch.uint8
        or image.ndim != 3
        or (image.shape[0] != 3)
    ):
        raise TypeError(
            f"to_pil expects a uint8 torch tensor [3, H, W], got {_describe(image)}; "
            "use load_image() to convert other inputs"
        )
    return Image.fromarray(image.detach().cpu().permute(1, 2, 0).contiguous().numpy())


def content_hash(t: torch.Tensor) -> str:
    """SHA-1 hex digest of a tensor's dtype, shape and bytes; a cache key for images."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"content_hash expects a torch.Tensor, got {_describe(t)}")
    t = t.detach().cpu().resolve_conj().resolve_neg().contiguous()
    h = hashlib.sha1()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# masks and label maps
# --------------------------------------------------------------------------------------------


def _check_size(size: tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size)
        or min(size) <= 0
    ):
        raise ValueError(f"size must be a pair of positive ints (H, W), got {size!r}")
    return int(size[0]), int(size[1])


def _resize_nearest(t: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Nearest resize of a 2-D tensor as PIL NEAREST does it, dtype preserved."""
    return t if size is None else resize_mask(t, size, grid="center")


def _mask_pil_to_array(img: Image.Image) -> np.ndarray:
    """PIL mask -> numpy array (2-D, or HxWx3/4 for colour images).

    Palette images give their palette indices; alpha of LA / PA images is dropped.
    """
    mode = img.mode
    if mode in ("1", "L", "P", "F") or mode in _HIGH_BIT_MODES:
        return np.asarray(img)
    if mode in ("LA", "PA", "La"):
        return np.asarray(img.getchannel(0))
    if mode in ("RGB", "RGBA", "RGBX"):
        return np.asarray(img)
    try:
        return np.asarray(img.convert("RGB"))
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot read a mask from a PIL image of mode {mode!r}: {e}") from e


def _to_2d(x: MaskInput, what: str) -> tuple[torch.Tensor, bool]:
    """Any mask input -> (2-D CPU tensor, came_from_palette_image)."""
    palette = False
    given: object = x
    channels_last = False  # a 1xNxC array or tensor is 1xHxW; a PIL image's array is HxWxC
    if isinstance(x, (str, os.PathLike)):
        x = _open(x, what)
    if isinstance(x, Image.Image):
        palette = x.mode in ("P", "PA")
        given = x
        x = _mask_pil_to_array(x)
        channels_last = True
    if isinstance(x, np.ndarray):
        if (
            x.dtype == np.bool_
            or np.issubdtype(x.dtype, np.integer)
            or np.issubdtype(x.dtype, np.floating)
        ):
            if x.dtype == np.uint64 and x.size and int(x.max()) > np.iinfo(np.int64).max:
                raise ValueError(
                    f"{what} values must fit int64, got a maximum of {int(x.max())} "
                    f"({_describe(given)})"
                )
            if x.dtype in (np.uint16, np.uint32, np.uint64):
                x = x.astype(np.int64)  # torch lacks full support for these
            elif np.issubdtype(x.dtype, np.floating) and x.dtype not in (
                np.float16,
                np.float32,
                np.float64,
            ):
                x = x.astype(np.float64)
            t = _as_tensor(x)
        else:
            raise TypeError(
                f"unsupported {what} dtype: got {_describe(given)}; accepted: bool, integer "
                "or float"
            )
    elif isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.is_complex():
            raise TypeError(
                f"unsupported {what} dtype: got {_describe(given)}; accepted: bool, integer "
                "or float"
            )
        if t.dtype in (torch.uint16, torch.uint32, torch.uint64):
            t = t.to(torch.int64)  # most torch ops lack these dtypes
        elif t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
            t = t.to(torch.float32)  # bfloat16 / float8: exact in float32
    else:
        raise TypeError(f"unsupported {what} type: got {_describe(given)}. Accepted: {_MASK_FORMS}")

    if t.ndim == 3:
        last = t.shape[2] in (1, 3, 4) and (channels_last or t.shape[0] != 1)
        if last and t.shape[2] == 1:
            t = t[..., 0]
        elif last:
            t = _first_equal_channel(t, given, what)
        elif t.shape[0] == 1:
            t = t[0]
        else:
            raise ValueError(
                f"unsupported {what} shape: got {_describe(given)}. Accepted: {_MASK_FORMS}"
            )
    elif t.ndim != 2:
        raise ValueError(
            f"unsupported {what} shape: got {_describe(given)}. Accepted: {_MASK_FORMS}"
        )
    _check_nonempty(tuple(t.shape), given, what)
    return t, palette


def _first_equal_channel(t: torch.Tensor, given: object, what: str) -> torch.Tensor:
    """HxWx3/4 -> HxW, after checking the colour channels (alpha ignored) are identical."""
    rgb = t[..., :3]
    if not bool((rgb == rgb[..., :1]).all()):
        raise ValueError(
            f"{what} has colour channels that differ ({_describe(given)}), so it is not a "
            "single-channel mask; pass one channel (e.g. mask[..., 0]) or a palette/label image"
        )
    return t[..., 0]


def _values_str(v: torch.Tensor, limit: int = 10) -> str:
    """Short list of the (sorted unique) values `v`, for error messages."""
    vals = [f"{x:g}" if isinstance(x, float) else str(x) for x in v[:limit].tolist()]
    more = f", ... ({len(v)} values)" if len(v) > limit else ""
    return "[" + ", ".join(vals) + more + "]"


def load_mask(mask: MaskInput, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Binary mask as bool tensor [H, W]; resized nearest to `size` (H, W) when given and different.

    Values: bool as is; integer data must hold at most one nonzero value (0/1, 0/255, or a
    palette image's single nonzero index), which is the foreground; float data is either
    0/255, or in [0, 1] and thresholded at > 0.5. Several nonzero values mean a label map and
    raise ValueError: select one object with ``mask == label`` or use `load_label_map`.
    Resizing picks the source pixel PIL NEAREST picks.
    """
    size = _check_size(size)
    t, palette = _to_2d(mask, "mask")
    if t.dtype == torch.bool:
        out = t
    elif t.is_floating_point():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"float mask contains NaN or infinite values: {_describe(mask)}")
        values = torch.unique(t)
        if bool(torch.isin(values, torch.tensor([0.0, 255.0], dtype=t.dtype)).all()):
            out = t > 0
        elif float(values.min()) >= 0.0 and float(values.max()) <= 1.0:
            out = t > 0.5
        else:
            raise ValueError(
                f"float mask values must be in [0, 1] (thresholded at 0.5) or exactly 0/255, "
                f"got values {_values_str(values)} ({_describe(mask)})"
            )
    else:
        values = torch.unique(t)
        nonzero = values[values != 0]
        if bool((values < 0).any()) or len(nonzero) > 1:
            source = "palette indices" if palette else "values"
            raise ValueError(
                f"mask has {source} {_values_str(values)}, so it looks like a label map, not a "
                "binary mask (expected 0/1 or 0/255); select one object with (mask == label), "
                "or use load_label_map() for multi-object masks"
            )
        out = t != 0
    return _resize_nearest(out.contiguous(), size)


def load_label_map(mask: MaskInput, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Integer label map as int64 tensor [H, W] (one id per object, 0 usually background).

    For multi-object masks such as video object segmentation first-frame annotations: palette
    PNGs give their indices, gray images and integer arrays their values, bool masks 0/1.
    Float arrays are accepted only if all values are integers. Colour (RGB) label images with
    differing channels are rejected: save them as palette PNGs or map colours to ids first.
    Resizing picks the source pixel PIL NEAREST picks.
    """
    size = _check_size(size)
    t, _ = _to_2d(mask, "label map")
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
            raise ValueError(
                f"float label map must contain whole numbers only, got {_describe(mask)}; "
                "label maps hold integer object ids"
            )
    out = t.to(torch.int64).contiguous()
    return _resize_nearest(out, size)


def davis_palette() -> list[int]:
    """The PASCAL VOC / DAVIS colour map as a flat 768-entry PIL palette (label k -> colour)."""
    idx = np.arange(256)
    pal = np.zeros((256, 3), dtype=np.int64)
    for bit in range(8):
        for ch in range(3):
            pal[:, ch] |= ((idx >> (3 * bit + ch)) & 1) << (7 - bit)
    return pal.astype(np.uint8).ravel().tolist()


def save_label_png(path: str | os.PathLike, labels: np.ndarray | torch.Tensor) -> None:
    """Write an integer label map [H, W] (0..255) as an indexed palette PNG (DAVIS format)."""
    arr = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"{path}: label values must be in 0..255 for an indexed PNG")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(arr.astype(np.uint8))
    image.putpalette(davis_palette())
    image.save(path)
