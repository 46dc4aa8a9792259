"""`promptseg demo`: a local page that runs several models side by side (Gradio).

    promptseg demo --models clipseg_test_tiny test_colorkey --random-weights

`DemoEngine` is the logic the page calls (models load lazily and stay cached; one `Predictor`
per model keeps the image embedding, so a new prompt on the same image only re-runs the
decoder); `build_app` builds the page around an engine; `launch` serves it. Gradio is an
optional extra (`pip install "promptseg[demo]"`), imported only by `build_app`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import PromptsegError
from .imageio import content_hash, load_image
from .jsonable import to_jsonable
from .predictor import Predictor
from .prompts import TextPrompt, VisualPrompt, Vocabulary
from .zoo import list_models, model_info

__all__ = [
    "TEST_MODELS",
    "DemoEngine",
    "DemoResult",
    "ModelStatus",
    "build_app",
    "default_models",
    "launch",
    "model_status",
]

TEST_MODELS = ("test_colorkey", "clipseg_test_tiny", "sine_test_tiny")
RANDOM_SEED = 0  # random weights: the same model at every start (as `--random-weights`)
PANEL_WIDTH = 480  # overlays are shown at this width, under a banner naming model and weights
INSTALL_HINT = 'the demo needs Gradio: pip install "promptseg[demo]"'

_BADGES = {  # weights kind -> (banner text, banner colour)
    "cached": ("pretrained weights (cached)", (22, 128, 60)),
    "download": ("pretrained weights (downloaded on first use)", (22, 96, 160)),
    "random": ("RANDOM WEIGHTS: masks mean nothing", (180, 30, 30)),
    "test": ("TEST MODEL: colour matching, no learned weights", (170, 100, 0)),
}


@dataclass(frozen=True)
class ModelStatus:
    """One model of the page and what its weights are."""

    name: str
    weights: str  # cached | download | random | test

    @property
    def badge(self) -> str:
        """The words shown beside the model's name."""
        return _BADGES[self.weights][0]

    @property
    def trained(self) -> bool:
        """True when its masks come from real weights."""
        return self.weights in ("cached", "download")


def model_status(
    name: str, *, random_weights: bool = False, cache_dir: str | Path | None = None
) -> ModelStatus:
    """What weights `name` would run with on this machine (raises on an unknown name)."""
    from .weights import native_checkpoint_path

    card = model_info(name)
    if card.converter is None:
        return ModelStatus(card.name, "test")
    if random_weights or not card.weights:
        return ModelStatus(card.name, "random")
    cached = native_checkpoint_path(card, cache_dir).is_file()
    return ModelStatus(card.name, "cached" if cached else "download")


def default_models(cache_dir: str | Path | None = None) -> list[str]:
    """The released models whose weights are cached, then the test models."""
    ready = [
        n
        for n in list_models(pretrained=True)
        if model_status(n, cache_dir=cache_dir).weights == "cached"
    ]
    return ready + list(TEST_MODELS)


@dataclass
class DemoResult:
    """What one press of "Run" gives: overlays, a table, the JSON record and files to download."""

    overlays: list[tuple[Image.Image, str]] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def table_markdown(self) -> str:
        """The rows as a Markdown table (model, weights, label, score, pixels, times)."""
        head = "| model | weights | mask | score | pixels | encode image (s) | decode (s) |"
        lines = [head, "|" + "---|" * 7]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows]
        notes = "".join(f"\n- {n}" for n in self.notes)
        return "\n".join(lines) + ("\n" + notes if notes else "")


class DemoEngine:
    """Lazily built, cached models (one Predictor each) and the function the page calls."""

    def __init__(
        self,
        models: list[str] | None = None,
        *,
        random_weights: bool = False,
        device: str | None = None,
        cache_dir: str | Path | None = None,
        out_dir: str | Path | None = None,
    ) -> None:
        names = list(models) if models else default_models(cache_dir)
        self.statuses = {
            s.name: s
            for s in (
                model_status(n, random_weights=random_weights, cache_dir=cache_dir) for n in names
            )
        }
        self.device = device
        self.cache_dir = cache_dir
        self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="promptseg-demo-"))
        self._predictors: dict[str, Predictor] = {}
        self._runs = 0

    @property
    def names(self) -> list[str]:
        return list(self.statuses)

    def predictor(self, name: str) -> Predictor:
        """The model's Predictor, built on first use."""
        if name not in self._predictors:
            from .zoo import create_model

            status = self.statuses[name]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_SEED)
                model = create_model(
                    name,
                    pretrained=status.trained,
                    cache_dir=self.cache_dir,
                    device=self.device,
                )
            self._predictors[name] = Predictor(model.eval())
        return self._predictors[name]

    def prompts_for(
        self,
        name: str,
        texts: list[str],
        reference: tuple[Any, Any] | None,
        vocabulary: str | None,
    ) -> tuple[list[Any], list[str]]:
        """The prompts `name` can take, and a note for each kind it cannot."""
        caps = model_info(name).capabilities
        prompts: list[Any] = []
        skipped: list[str] = []
        if texts:
            if "text" in caps:
                prompts += [TextPrompt(t) for t in texts]
            else:
                skipped.append("text")
        if reference is not None:
            if "visual" in caps:
                prompts.append(VisualPrompt(*reference))
            else:
                skipped.append("reference")
        if vocabulary:
            if "open_vocab" in caps:
                prompts.append(Vocabulary(vocabulary))
            else:
                skipped.append("vocabulary")
        notes = [f"{name} takes no {kind} prompt; left out" for kind in skipped]
        return prompts, notes

    def run(
        self,
        image: Any,
        model_names: list[str],
        texts: list[str] | str | None = None,
        reference: tuple[Any, Any] | None = None,
        vocabulary: str | None = None,
        threshold: float | None = None,
    ) -> DemoResult:
        """Segment `image` with each model; overlays, table rows, JSON record and files."""
        if image is None:
            raise ValueError("upload an image first")
        if not model_names:
            raise ValueError("choose at least one model")
        if isinstance(texts, str):
            texts = texts.splitlines()
        texts = [t.strip() for t in texts or [] if t.strip()]
        vocabulary = (vocabulary or "").strip() or None
        if not texts and reference is None and vocabulary is None:
            raise ValueError("give a prompt: text(s), a reference image + mask, or a vocabulary")
        img = load_image(image)
        key = content_hash(img)
        self._runs += 1
        folder = self.out_dir / f"run_{self._runs:03d}"
        out = DemoResult(record={"image_size": list(img.shape[1:]), "models": []})
        for name in model_names:
            status = self.statuses[name]
            prompts, notes = self.prompts_for(name, texts, reference, vocabulary)
            out.notes += notes
            if not prompts:
                continue
            try:
                pred = self.predictor(name)
                cached = pred.is_image_set and pred.get_image_embedding().key == key
                start = time.perf_counter()
                pred.set_image(img)
                encode = 0.0 if cached else time.perf_counter() - start
                start = time.perf_counter()
                res = pred.predict(prompts, threshold=threshold)
                decode = time.perf_counter() - start
            except (PromptsegError, ValueError, TypeError, OSError, RuntimeError) as exc:
                out.notes.append(f"{name}: {exc}")
                continue
            paths = res.save(folder / name.replace(".", "_"))
            masks = [p for p in paths if p.name.startswith("mask_")]
            out.files += masks
            times = f"encode {'cached' if cached else f'{encode:.2f} s'} · decode {decode:.2f} s"
            out.overlays.append(
                (_with_banner(res.overlay(), name, status, times), f"{name} ({status.badge})")
            )
            areas = res.masks.sum(dim=(1, 2)).tolist()
            scores = res.scores.tolist()
            for i, label in enumerate(res.labels):
                enc = "cached" if cached else f"{encode:.3f}"
                out.rows.append(
                    [name, status.badge, label, f"{scores[i]:.3f}", areas[i], enc, f"{decode:.3f}"]
                )
            out.record["models"].append(
                {
                    "model": name,
                    "weights": status.weights,
                    "labels": res.labels,
                    "scores": scores,
                    "pixels": areas,
                    "level": res.level,
                    "image_cached": cached,
                    "seconds": {"encode_image": encode, "decode": decode},
                    "mask_files": [str(p.relative_to(folder)) for p in masks],
                    "meta": to_jsonable(res.meta, finite_only=True),
                }
            )
        out.record["prompts"] = {"text": texts, "reference": reference is not None}
        out.record["vocabulary"] = vocabulary
        out.record["notes"] = out.notes
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "results.json"
        path.write_text(json.dumps(out.record, indent=2))
        out.files.insert(0, path)
        return out


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _with_banner(overlay: Image.Image, name: str, status: ModelStatus, times: str) -> Image.Image:
    """The overlay at PANEL_WIDTH under a banner: model name, weights badge, times."""
    w = PANEL_WIDTH
    h = max(1, round(overlay.height * w / overlay.width))
    body = overlay.convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
    text, colour = _BADGES[status.weights]
    top = 70
    panel = Image.new("RGB", (w, h + top), colour)
    panel.paste(body, (0, top))
    draw = ImageDraw.Draw(panel)
    draw.text((10, 6), name, fill=(255, 255, 255), font=_font(22))
    draw.text((10, 33), text, fill=(255, 255, 255), font=_font(16))
    draw.text((10, 51), times, fill=(235, 235, 235), font=_font(13))
    return panel


def reference_from_inputs(editor: Any, mask_upload: Any) -> tuple[Any, Any] | None:
    """(reference image, bool mask) from the sketch editor (and an uploaded mask), or None."""
    if not editor:
        return None
    background = editor.get("background") if isinstance(editor, dict) else editor
    if background is None:
        return None
    image = np.asarray(background)[..., :3]
    if mask_upload is not None:
        mask = np.asarray(mask_upload)
        mask = mask[..., :3].max(axis=-1) if mask.ndim == 3 else mask
        return image, mask > 127 if mask.dtype == np.uint8 else mask > 0.5
    drawn = np.zeros(image.shape[:2], dtype=bool)
    for layer in editor.get("layers") or []:
        layer = np.asarray(layer)
        if layer.ndim == 3 and layer.shape[:2] == drawn.shape:
            drawn |= (layer[..., 3] > 0) if layer.shape[-1] == 4 else layer.max(axis=-1) > 0
    if not drawn.any():
        raise ValueError("draw the reference mask on the reference image (or upload a mask)")
    return image, drawn


def _gradio() -> Any:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local page: no telemetry
    try:
        import gradio
    except ImportError as exc:
        raise PromptsegError(f"{INSTALL_HINT} ({exc})") from None
    return gradio


def _ready_markdown(engine: DemoEngine) -> str:
    lines = ["**Models** (loaded on first use, then kept):"]
    for s in engine.statuses.values():
        mark = "✅" if s.trained else "⚠️"
        lines.append(f"- {mark} `{s.name}`: {s.badge}")
    return "\n".join(lines)


def build_app(engine: DemoEngine) -> Any:
    """The Gradio Blocks page around `engine` (not started; see `launch`)."""
    gr = _gradio()

    def on_run(
        image: Any,
        models: list[str],
        texts: str,
        vocabulary: str,
        editor: Any,
        mask: Any,
        threshold: float | None,
    ) -> tuple:
        try:
            reference = reference_from_inputs(editor, mask)
            res = engine.run(image, models, texts, reference, vocabulary, threshold or None)
        except (PromptsegError, ValueError, TypeError) as exc:
            raise gr.Error(str(exc)) from None
        files = [str(p) for p in res.files]
        return res.overlays, res.table_markdown(), files, res.record

    choices = [(f"{s.name}  [{s.badge}]", s.name) for s in engine.statuses.values()]
    with gr.Blocks(title="promptseg demo") as app:
        gr.Markdown(
            "# promptseg: methods side by side\nUpload an image, choose models, give text "
            "prompts (one per line), a reference image with a mask drawn on it, or a vocabulary."
        )
        gr.Markdown(_ready_markdown(engine), elem_id="ready")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image", type="numpy", elem_id="image", height=320)
            with gr.Column():
                models = gr.CheckboxGroup(
                    choices,
                    value=engine.names[:2],
                    label="Models",
                    elem_id="models",
                )
                texts = gr.Textbox(label="Text prompts (one per line)", lines=3, elem_id="texts")
                vocabulary = gr.Textbox(
                    label="Vocabulary (';' between classes, ',' between synonyms)",
                    elem_id="vocab",
                )
                threshold = gr.Number(
                    label="Threshold (0: each model's default)", value=0, elem_id="thr"
                )
        with gr.Accordion("Reference image + mask (visual prompt)", open=False):
            with gr.Row():
                editor = gr.ImageEditor(
                    label="Reference: upload, then paint the object",
                    type="numpy",
                    elem_id="reference",
                )
                mask = gr.Image(
                    label="or upload its mask (white = object)",
                    type="numpy",
                    image_mode="L",
                    elem_id="ref_mask",
                )
        run = gr.Button("Run", variant="primary", elem_id="run")
        gallery = gr.Gallery(
            label="Overlays", columns=3, height="auto", object_fit="contain", elem_id="overlays"
        )
        table = gr.Markdown(elem_id="table")
        files = gr.File(
            label="Download: results.json and mask PNGs", file_count="multiple", elem_id="files"
        )
        record = gr.JSON(label="Results (JSON)", elem_id="json")
        run.click(
            on_run,
            [image, models, texts, vocabulary, editor, mask, threshold],
            [gallery, table, files, record],
            concurrency_limit=1,
        )
    return app


def launch(
    models: list[str] | None = None,
    *,
    port: int = 7860,
    host: str = "127.0.0.1",
    random_weights: bool = False,
    device: str | None = None,
    cache_dir: str | Path | None = None,
    block: bool = True,
) -> Any:
    """Build the engine and page and serve it on http://host:port (returns the app)."""
    engine = DemoEngine(models, random_weights=random_weights, device=device, cache_dir=cache_dir)
    app = build_app(engine)
    app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        allowed_paths=[str(engine.out_dir)],
    )
    return app
