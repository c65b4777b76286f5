"""Watch a fixed-point masked generative model denoise: a Gradio page (also a Hugging Face Space, docs/space.md).

    python app.py                                  # the demo's models, when `bash scripts/demo.sh` made them
    python app.py --model outputs/demo/fp-mdlm --model outputs/demo/mdlm/final --port 7860
    python app.py --tiny                           # random-weight tiny models: try the page, run the tests

Text tab: a prompt (and an optional suffix: infilling), the budget dial and the sampler settings; the canvas
streams while it denoises (masks grey, newly revealed tokens yellow), a plot shows the solver's iterations and
residual per step, a table the block passes and wall time. Pick a second model to compare both at the same budget
and seed. Image tab (FP-MaskGIT + VQ folders): pick classes and watch the grid resolve. The page's logic lives in
`fpmgm_hf.demo.app`; this file lays it out.
"""

from __future__ import annotations

import argparse
import html
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if (ROOT / "src" / "fpmgm_hf").is_dir():  # serve this checkout's code (a Space, a git worktree), not another install
    sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry calls from a demo server

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from fpmgm_hf.demo import app as engine  # noqa: E402
from fpmgm_hf.demo import render  # noqa: E402
from fpmgm_hf.demo.app import IMAGE, TEXT, DemoModels, LoadError, SettingsError  # noqa: E402

LOG = logging.getLogger("fpmgm_app")
NONE = "(none)"
PLOT_EVERY_S = 1.0  # redrawing the plot costs ~0.1 s: live updates at most this often
MODELS_ENV = "FPMGM_APP_MODELS"  # a Space has no command line: its models come from this variable
INTRO = """# Fixed-point masked generative models, live
Masked positions (grey) resolve step by step; **yellow** tokens were revealed in the last step, **blue** ones are
yours. The **budget** is the number of transformer-block passes per sample: the budget dial trades quality for
compute. With **3SR** reuse the solver warm-starts from the previous step and converges in fewer iterations; the
plot shows the iterations and the residual of every step."""
SETTING_NAMES = ("budget", "steps", "reuse", "fp_schedule", "temperature", "seed", "delay_ms")


# ---------------------------------------------------------------------------------------------- handlers


def _error(message: str) -> str:
    return render.status_html("error", message + " Nothing else is affected: fix it and press Generate again.")


def _failure(err: Exception, where: str) -> str:
    """A readable line for anything that went wrong inside a run; the traceback goes to the server log only."""
    if isinstance(err, (SettingsError, LoadError)):
        return _error(str(err))
    if isinstance(err, ValueError):  # the library names the argument and its valid values
        return _error(f"{where}: {err}")
    LOG.error("%s failed", where, exc_info=err)
    return _error(f"{where} failed ({type(err).__name__}: {err}).")


class TextTab:
    """The text tab's handler: one or two models, the same request, one after the other."""

    def __init__(self, models: DemoModels):
        self.models = models

    def placeholder(self, name: str, element_id: str) -> str:
        return (f'<div class="fpmgm-canvas" id="{element_id}" data-masks="0"><span class="canvas-title">'
                f"{html.escape(name)}: press Generate</span></div>")

    def run(self, model_name, compare_name, prompt, suffix, max_new_tokens, sampler, *settings):
        """Yields (status, canvas A, canvas B, plot, summary, text A, text B); untouched outputs are skipped."""
        skip = gr.skip()
        try:
            request = engine.parse_text_request(prompt, suffix, max_new_tokens, sampler=sampler,
                                                **dict(zip(SETTING_NAMES, settings, strict=True)))
            runs = [self.models.get(model_name, TEXT, "Model")]
            if compare_name not in (None, "", NONE):
                runs.append(self.models.get(compare_name, TEXT, "Compare with"))
            for loaded in runs:  # both budgets are checked before anything runs
                engine.step_plan(loaded, request.settings)
                engine.text_canvas(loaded, request)
        except SettingsError as err:
            yield (_error(str(err)),) + (skip,) * 6
            return
        results = []
        for index, loaded in enumerate(runs):
            try:
                yield from self._one(index, len(runs), loaded, request, results)
            except Exception as err:  # the page shows it; the server keeps serving
                yield (_failure(err, f"Generating with {loaded.name}"),) + (skip,) * 6
                return
        done = ", ".join(f"{r.name}: {r.block_passes} block passes in {r.wall_s:.2f} s" for r in results)
        yield (render.status_html("done", f"Done. {done}."), skip, skip, render.solver_figure(results),
               render.summary_markdown(results), skip, skip)

    def _one(self, index, count, loaded, request, results):
        skip, canvases, texts = gr.skip(), [gr.skip(), gr.skip()], [gr.skip(), gr.skip()]
        element_id, title = ("canvas-a", "canvas-b")[index], f"{loaded.name}"
        last_plot, initial, before = 0.0, engine.text_canvas(loaded, request)[1], None
        for item in engine.stream_text(loaded, request):
            if isinstance(item, engine.RunResult):  # the last step's tokens stay highlighted
                results.append(item)
                before = item.canvas[0] if before is None else before
                canvases[index] = render.canvas_html(loaded, item.canvas[0], before, item.initial[0],
                                                     f"{title}: done", element_id)
                texts[index] = render.decoded_text(loaded, item.canvas[0])
                yield (skip, *canvases, render.solver_figure(results), render.summary_markdown(results), *texts)
                return
            canvases[index] = render.canvas_html(loaded, item.canvas[0], item.previous[0], initial,
                                                 f"{title}: step {item.step}/{item.total}", element_id)
            before = item.previous[0]
            status = render.status_html("running", f"Model {index + 1}/{count}, {loaded.name}: step {item.step} "
                                        f"of {item.total}", (item.step, item.total))
            plot = skip
            if time.perf_counter() - last_plot > PLOT_EVERY_S:
                plot = render.solver_figure(results, (loaded.name, item.live), item.total)
                last_plot = time.perf_counter()
            yield (status, *canvases, plot, skip, skip, skip)


class ImageTab:
    """The image tab's handler: class labels in, a grid that resolves step by step out."""

    def __init__(self, models: DemoModels):
        self.models = models

    def classes(self, model_name):
        names = list(self.models.models[model_name].class_names) if model_name in self.models.models else []
        return gr.update(choices=names, value=names[:4])

    def run(self, model_name, classes, per_class, guidance, *settings):
        """Yields (status, image, plot, summary)."""
        skip = gr.skip()
        try:
            loaded = self.models.get(model_name, IMAGE, "Model")
            request = engine.parse_image_request(loaded, classes, per_class, guidance_scale=guidance,
                                                 **dict(zip(SETTING_NAMES, settings, strict=True)))
            engine.step_plan(loaded, request.settings)
        except SettingsError as err:
            yield _error(str(err)), skip, skip, skip
            return
        try:
            for item in engine.stream_images(loaded, request):
                if isinstance(item, engine.RunResult):
                    grid = render.image_grid(loaded, item.canvas, item.canvas, request.per_class)
                    yield (render.status_html("done", f"Done: {item.block_passes} block passes per image in "
                                                      f"{item.wall_s:.2f} s."), grid, render.solver_figure([item]),
                           render.summary_markdown([item]))
                    return
                grid = render.image_grid(loaded, item.canvas, item.previous, request.per_class)
                status = render.status_html("running", f"step {item.step} of {item.total}", (item.step, item.total))
                yield status, grid, skip, skip
        except Exception as err:  # the page shows it; the server keeps serving
            yield _failure(err, f"Generating with {loaded.name}"), skip, skip, skip


# ------------------------------------------------------------------------------------------------ layout


def _settings(default_budget: int, first_row):
    """The shared sampling fields, in SETTING_NAMES order; `first_row()` adds the tab's own fields beside Steps."""
    budget = gr.Slider(1, 1024, value=default_budget, step=1, label="Budget (transformer-block passes per sample)",
                       elem_id="budget")
    with gr.Row():
        own = first_row()
        steps = gr.Number(0, precision=0, label="Steps (0 = from budget)", elem_id="steps", min_width=100)
    with gr.Row():
        reuse = gr.Radio(list(engine.REUSE_MODES), value="3sr", label="Reuse (solver warm start)", elem_id="reuse")
        schedule = gr.Dropdown(list(engine.FP_SCHEDULES), value="decreasing", label="Schedule (iterations per step)",
                               elem_id="schedule")
    with gr.Row():
        temperature = gr.Number(1.0, label="Temperature (0 = greedy)", elem_id="temperature")
        seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
        delay = gr.Slider(0, engine.MAX_DELAY_MS, value=60, step=10, label="Slow motion (ms per step)",
                          elem_id="delay")
    return own, [budget, steps, reuse, schedule, temperature, seed, delay]


def _text_tab(models: DemoModels):
    tab, names = TextTab(models), models.names(TEXT)
    with gr.Row():
        with gr.Column(scale=2):
            with gr.Row():
                model = gr.Dropdown(names, value=names[0], label="Model", elem_id="model")
                compare = gr.Dropdown([NONE] + names, value=NONE, label="Compare with (same budget and seed)",
                                      elem_id="compare")
            info = gr.Markdown(models.models[names[0]].describe())
            prompt = gr.Textbox("ROMEO:\n", lines=3, label="Prompt (a mask token in it is infilled too)",
                                elem_id="prompt")
            suffix = gr.Textbox("", label="Suffix (optional: the new tokens fill the gap before it)", elem_id="suffix")
            (max_new, sampler), settings = _settings(96, lambda: (
                gr.Number(64, precision=0, label="Max new tokens", elem_id="max-new-tokens", min_width=100),
                gr.Dropdown(list(engine.SAMPLERS), value="ancestral", label="Sampler", elem_id="sampler",
                            min_width=120)))
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id="generate")
                stop = gr.Button("Stop", elem_id="stop")
        with gr.Column(scale=3):
            status = gr.HTML(render.status_html("idle", "Ready."), elem_id="status")
            with gr.Row():
                canvas_a = gr.HTML(tab.placeholder(names[0], "canvas-a"), elem_id="canvas-a-box")
                canvas_b = gr.HTML(tab.placeholder("compare", "canvas-b"), elem_id="canvas-b-box", visible=False)
            plot = gr.Plot(label="Solver per step", format="png", elem_id="solver-plot")
            summary = gr.Markdown(elem_id="summary")
            with gr.Accordion("Decoded text", open=False):
                text_a = gr.Textbox(label="Model", lines=4, elem_id="text-a")
                text_b = gr.Textbox(label="Compare with", lines=4, visible=False, elem_id="text-b")
    model.change(lambda n: models.models[n].describe() if n in models.models else "", model, info)
    compare.change(lambda n: (gr.update(visible=n != NONE),) * 2, compare, [canvas_b, text_b])
    event = go.click(tab.run, [model, compare, prompt, suffix, max_new, sampler, *settings],
                     [status, canvas_a, canvas_b, plot, summary, text_a, text_b], show_progress="hidden",
                     concurrency_limit=1, api_name="generate_text")
    stop.click(None, cancels=[event])


def _image_tab(models: DemoModels):
    tab, names = ImageTab(models), models.names(IMAGE)
    with gr.Row():
        with gr.Column(scale=2):
            model = gr.Dropdown(names, value=names[0], label="Model", elem_id="image-model")
            first = list(models.models[names[0]].class_names)
            classes = gr.CheckboxGroup(first, value=first[:4], label="Classes (one column each)",
                                       elem_id="image-classes")
            (per_class, guidance), settings = _settings(96, lambda: (
                gr.Number(2, precision=0, label="Samples per class", elem_id="per-class", min_width=100),
                gr.Number(2.0, label="Guidance scale", elem_id="guidance", min_width=100)))
            with gr.Row():
                go = gr.Button("Generate images", variant="primary", elem_id="generate-images")
                stop = gr.Button("Stop", elem_id="stop-images")
        with gr.Column(scale=3):
            status = gr.HTML(render.status_html("idle", "Ready."), elem_id="image-status")
            image = gr.Image(label="Samples (grey: masked, yellow: revealed this step)", type="numpy",
                             format="png", elem_id="image-grid")
            plot = gr.Plot(label="Solver per step", format="png", elem_id="image-plot")
            summary = gr.Markdown(elem_id="image-summary")
    model.change(tab.classes, model, classes)
    event = go.click(tab.run, [model, classes, per_class, guidance, *settings], [status, image, plot, summary],
                     show_progress="hidden", concurrency_limit=1, api_name="generate_images")
    stop.click(None, cancels=[event])


def build_demo(models: DemoModels) -> gr.Blocks:
    with gr.Blocks(title="FP-MGM: watch it denoise", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        if models.problems:
            gr.Markdown("**Not loaded:**\n\n" + "\n".join(f"- {p}" for p in models.problems), elem_id="load-problems")
        if not models.models:
            gr.Markdown(engine.HOW_TO_MAKE_ONE, elem_id="no-model")
        if models.names(TEXT):
            with gr.Tab("Text", elem_id="tab-text"):
                _text_tab(models)
        if models.names(IMAGE):
            with gr.Tab("Images", elem_id="tab-images"):
                _image_tab(models)
    return demo


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], metavar="PATH",
                   help="save_pretrained folder of a text (with tokenizer files) or image (with vq/) model, or "
                        "hf://user/repo; repeat for more. Default: $" + MODELS_ENV + " (comma-separated), else the "
                        "demo's models.")
    p.add_argument("--tiny", action="store_true", help="also serve random-weight tiny models (built in a temp folder)")
    p.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    p.add_argument("--host", default=None, help="address to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="UNSAFE: let a model folder's tokenizer run its own Python code (auto_map)")
    args = p.parse_args(argv)
    if args.port is not None and not 0 < args.port < 65536:
        p.error(f"--port must be in 1..65535, got {args.port}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    return args


def model_paths(args, tiny_dir=None) -> list[str]:
    paths = list(args.model)
    if not paths:
        paths = [p.strip() for p in os.environ.get(MODELS_ENV, "").split(",") if p.strip()]
    if not paths and not args.tiny:
        paths = engine.default_model_paths(ROOT)
    return paths + (engine.build_tiny_models(tiny_dir) if tiny_dir else [])


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[app] %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests
    if args.threads:
        torch.set_num_threads(args.threads)
    # SIGTERM (a Space restart, `kill`, the browser test) unwinds like Ctrl-C, so the tiny models' temp folder goes
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with tempfile.TemporaryDirectory(prefix="fpmgm-app-tiny-") as tiny_dir:
        models = DemoModels.load(model_paths(args, tiny_dir if args.tiny else None), args.trust_remote_code)
        if not models.models:
            print(f"[app] {engine.HOW_TO_MAKE_ONE}", file=sys.stderr)
        demo = build_demo(models)
        demo.queue(max_size=32, default_concurrency_limit=1)
        demo.launch(server_name=args.host, server_port=args.port, css=render.CANVAS_CSS, show_error=False,
                    footer_links=["api"])


if __name__ == "__main__":
    main()
