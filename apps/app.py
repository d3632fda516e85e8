"""The Gradio app (``workbench app``): Compare, Arena, Curate and Votes tabs over :mod:`apps.handlers`.

Only layout and wiring live here; every button calls a plain handler. Keyboard shortcuts come from a small script
given to ``launch(head=...)`` (Gradio has no hotkey API): ``1``-``4`` choose (or rank, in order), ``t`` tie, ``b``
both bad, ``s`` skip, ``u`` undo, ``n`` or Space next; keys typed into a text box are left alone, and they act on
the visible tab's buttons only.

Safe defaults: binds 127.0.0.1, never creates a share link, enforces ``auth`` when given (the voter is then the
authenticated user), serves only images it produced or imported into its store (Gradio's cache; no
``allowed_paths``), and reports bad input as a visible message.
"""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports leave the machine

import gradio as gr

from apps.handlers import (
    AppContext,
    ArenaState,
    Cell,
    CurateState,
    InputError,
    RoundView,
    act,
    add_checkpoint,
    check_user,
    compare,
    curate_act,
    curate_ranking,
    export,
    for_display,
    grid_png,
    load_folder,
    new_curate_round,
    new_round,
    slider_pair,
    stats_text,
    submit_vote,
)
from apps.jobs import job_panel
from apps.personal import build_personal_tab
from apps.tabs_leaderboard import leaderboard_tab

MAX_K = 4
#: button id suffix -> the action key the handlers take
BUTTONS: tuple[tuple[str, str, str], ...] = (
    ("1", "1", "Image 1 [1]"),
    ("2", "2", "Image 2 [2]"),
    ("3", "3", "Image 3 [3]"),
    ("4", "4", "Image 4 [4]"),
    ("tie", "t", "Tie [t]"),
    ("bad", "b", "Both bad [b]"),
    ("skip", "s", "Skip [s]"),
    ("undo", "u", "Undo [u]"),
)

SHORTCUTS_JS = """
<script>
(() => {
  const KEYS = {"1": "1", "2": "2", "3": "3", "4": "4", "t": "tie", "b": "bad", "s": "skip", "u": "undo",
                "n": "next", " ": "next"};
  const TYPING = new Set(["text", "search", "number", "password", "email", "url", "tel", ""]);
  function typing(el) {
    if (!el) return false;
    if (el.isContentEditable || el.tagName === "TEXTAREA" || el.tagName === "SELECT") return true;
    return el.tagName === "INPUT" && TYPING.has((el.getAttribute("type") || "").toLowerCase());
  }
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat || typing(e.target)) return;
    const name = KEYS[e.key.toLowerCase()];
    if (!name) return;
    for (const tab of ["arena", "curate", "personal"]) {
      const btn = document.getElementById(`${tab}-${name}`);
      if (btn && btn.offsetParent !== null && !btn.disabled) {
        e.preventDefault();
        btn.click();
        return;
      }
    }
  });
})();
</script>
"""

CSS = """
.vote-image img { image-rendering: pixelated; }
#compare-gallery img { image-rendering: pixelated; }
"""


def _user(name: str | None, request: gr.Request | None) -> str:
    return check_user(name, getattr(request, "username", None) if request is not None else None)


def _session(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Show :class:`InputError` (and store refusals) as a visible message instead of a stack trace."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ValueError as exc:  # InputError, StoreError, ...: messages meant for the user
            raise gr.Error(str(exc)) from None

    return wrapper


def _progress(progress: Any) -> Callable[[float, str], None]:
    return lambda fraction, desc: progress(fraction, desc=desc)


def _image_updates(view: RoundView | None) -> list[Any]:
    if view is None:
        return [gr.update() for _ in range(MAX_K)]
    out = []
    for i in range(MAX_K):
        if i < len(view.images):
            out.append(gr.update(value=view.images[i], label=view.labels[i], visible=True))
        else:
            out.append(gr.update(value=None, visible=False))
    return out


def _button_updates(view: RoundView | None) -> list[Any]:
    if view is None:
        return [gr.update() for _ in range(2)]
    k = len(view.images)
    return [gr.update(visible=k > 2) for _ in range(2)]  # buttons 3 and 4


def build_app(ctx: AppContext) -> gr.Blocks:
    s = ctx.settings
    names = ctx.renderer.names()
    with gr.Blocks(title="Diffusion workbench", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "## Diffusion workbench\nCompare checkpoints on identical noise, vote in the Arena, curate your own "
            f"images; every vote is stored in `{s.db}` and exports to what `workbench train` reads."
        )
        user = gr.Textbox(
            label="user (ignored when you are logged in: votes go to your login)",
            placeholder="your name or a pseudonym",
            elem_id="user",
            max_lines=1,
        )
        with gr.Tabs():
            # ---------------------------------------------------------------------------------------- Compare
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    c_ckpts = gr.CheckboxGroup(names, value=names[:2], label="checkpoints")
                    c_scorers = gr.CheckboxGroup(s.scorers, value=s.scorers, label="scorers")
                with gr.Row():
                    c_add = gr.Textbox(
                        label="add a checkpoint: [NAME=]PATH (LoRA folder, kohya .safetensors, UNet folder, "
                        "training run or runs/x/checkpoints/step_N)",
                        max_lines=1,
                        scale=4,
                    )
                    c_add_btn = gr.Button("Add checkpoint", scale=1)
                with gr.Row():
                    c_prompt = gr.Textbox(label="prompt (empty: draw from the set)", max_lines=3, scale=3)
                    c_set = gr.Dropdown(s.prompt_sets, value=s.prompt_sets[0], label="prompt set", scale=1)
                    c_seeds = gr.Textbox(value="0-3", label="seeds (e.g. 0-3,10)", max_lines=1, scale=1)
                with gr.Row():
                    c_sampler = gr.Dropdown(_samplers(), value=s.sampler, label="sampler")
                    c_steps = gr.Number(value=s.steps, precision=0, label="steps")
                    c_guidance = gr.Number(value=s.guidance, label="guidance")
                    c_sweep = gr.Textbox(label="guidance sweep (e.g. 1,3,5,7.5; empty: off)", max_lines=1)
                c_run = gr.Button("Generate", variant="primary", elem_id="compare-run")
                c_used = gr.Markdown()
                c_gallery = gr.Gallery(
                    label="images", columns=4, height="auto", format="png", elem_id="compare-gallery"
                )
                with gr.Row():
                    c_a = gr.Number(value=1, precision=0, label="slider: image", minimum=1)
                    c_b = gr.Number(value=2, precision=0, label="against image", minimum=1)
                    c_show = gr.Button("Show in slider")
                c_slider = gr.ImageSlider(label="before / after", elem_classes=["vote-image"])
                c_file = gr.File(label="grid PNG", interactive=False)
                c_cells = gr.State([])

            # ------------------------------------------------------------------------------------------ Arena
            with gr.Tab("Arena", id="arena"):
                with gr.Row():
                    a_prompt = gr.Textbox(
                        label="prompt (empty: draw from the set)",
                        max_lines=2,
                        scale=3,
                        elem_id="arena-prompt",
                    )
                    a_set = gr.Dropdown(s.prompt_sets, value=s.prompt_sets[0], label="prompt set", scale=1)
                with gr.Row():
                    a_k = gr.Radio(["2", "4"], value="2", label="images per round", elem_id="arena-k")
                    a_source = gr.Radio(
                        [("seeds of one checkpoint", "seeds"), ("across checkpoints (blind)", "checkpoints")],
                        value="seeds",
                        label="images from",
                    )
                    a_mode = gr.Radio(
                        [("best of K", "best"), ("full ranking", "rank")], value="best", label="vote"
                    )
                    a_ckpts = gr.CheckboxGroup(names, value=names[:1], label="checkpoints")
                a_images, a_buttons, a_next, a_status, a_reveal, a_shown = _vote_panel("arena")
                a_state = gr.State(ArenaState())

            # ----------------------------------------------------------------------------------------- Curate
            with gr.Tab("Curate", id="curate"):
                with gr.Row():
                    u_folder = gr.Textbox(
                        label="folder of your images", max_lines=1, scale=3, elem_id="curate-folder"
                    )
                    u_prompt = gr.Textbox(
                        label="prompt for images without one", max_lines=2, scale=2, elem_id="curate-prompt"
                    )
                with gr.Row():
                    u_strategy = gr.Radio(
                        [
                            ("Swiss (close win rates, unseen pairs)", "swiss"),
                            ("winner stays", "winner_stays"),
                        ],
                        value="swiss",
                        label="pairing",
                    )
                    u_k = gr.Radio(["2", "4"], value="2", label="images per round", elem_id="curate-k")
                    u_mode = gr.Radio(
                        [("best of K", "best"), ("full ranking", "rank")], value="best", label="vote"
                    )
                    u_load = gr.Button("Load folder", elem_id="curate-load")
                u_summary = gr.Markdown()
                u_images, u_buttons, u_next, u_status, u_reveal, u_shown = _vote_panel("curate")
                u_table = gr.Dataframe(
                    headers=["file", "win rate", "compared", "prompt"], label="standings", interactive=False
                )
                u_state = gr.State(CurateState())

            # apps/personal.py: personal scorer, active pairs, before/after; apps/jobs.py: the personal fine-tune
            build_personal_tab(ctx, user, extras=[lambda ab: job_panel(ctx, user, [c_ckpts, a_ckpts, *ab])])

            # ------------------------------------------------------------------------------------------ Votes
            with gr.Tab("Votes", id="votes"):
                v_user = gr.Textbox(label="only this user (empty: everyone)", max_lines=1)
                with gr.Row():
                    v_stats_btn = gr.Button("Statistics", elem_id="votes-stats")
                    v_export_btn = gr.Button("Export for training", variant="primary", elem_id="votes-export")
                v_stats = gr.Code(label="statistics", language=None)
                v_export = gr.Markdown()
                v_file = gr.File(label="Pick-a-Pic parquet", interactive=False)

            leaderboard_tab(ctx.store)  # apps/tabs_leaderboard.py: ratings from the votes, users overview

        # ------------------------------------------------------------------------------------------ wiring
        @_guard
        def on_compare(
            ckpts,
            prompt,
            pset,
            seeds,
            sampler,
            steps,
            guidance,
            sweep,
            scorers,
            progress=gr.Progress(),  # noqa: B008 (Gradio injects it)
        ):
            text, cells = compare(
                ctx,
                ckpts or [],
                prompt,
                seeds,
                prompt_set=pset,
                sampler=sampler,
                steps=steps,
                guidance=guidance,
                guidance_sweep=sweep,
                scorers=scorers or [],
                progress=_progress(progress),
            )
            out = Path(tempfile.mkdtemp(prefix="workbench-grid-")) / "grid.png"
            grid_png(cells, out, columns=len({c.seed for c in cells}))
            gallery = [(for_display(c.image), c.caption()) for c in cells]
            pair = tuple(for_display(x) for x in slider_pair(cells, 0, min(1, len(cells) - 1)))
            return cells, f"**prompt:** {text}", gallery, pair, str(out)

        c_run.click(
            on_compare,
            [c_ckpts, c_prompt, c_set, c_seeds, c_sampler, c_steps, c_guidance, c_sweep, c_scorers],
            [c_cells, c_used, c_gallery, c_slider, c_file],
            api_name="compare",
            concurrency_id="generate",
            concurrency_limit=1,
        )

        @_guard
        def on_add(spec, compare_value, arena_value):
            name = add_checkpoint(ctx, spec)
            choices = ctx.renderer.names()
            return (
                gr.update(choices=choices, value=[*(compare_value or []), name]),
                gr.update(choices=choices, value=arena_value),
                "",
            )

        c_add_btn.click(
            on_add, [c_add, c_ckpts, a_ckpts], [c_ckpts, a_ckpts, c_add], api_name="add_checkpoint"
        )

        @_guard
        def on_slider(cells: list[Cell], a, b):
            if not cells:
                raise InputError("generate a comparison first")
            return tuple(for_display(x) for x in slider_pair(cells, int(a or 1) - 1, int(b or 1) - 1))

        c_show.click(on_slider, [c_cells, c_a, c_b], c_slider, api_name="slider")

        arena_outputs = [a_state, *a_images, *a_buttons[2:4], a_status, a_reveal, a_shown]

        def arena_out(state: ArenaState, view: RoundView | None) -> list[Any]:
            return [
                state,
                *_image_updates(view),
                *_button_updates(view),
                state.message,
                view.reveal if view else "",
                f"**prompt:** {view.prompt}" if view else gr.update(),
            ]

        @_guard
        def on_arena_next(
            name,
            prompt,
            pset,
            k,
            source,
            mode,
            ckpts,
            request: gr.Request,
            progress=gr.Progress(),  # noqa: B008 (Gradio injects it)
        ):
            state, view = new_round(
                ctx,
                ArenaState(),
                user=_user(name, request),
                prompt=prompt,
                prompt_set=pset,
                k=k,
                source=source,
                checkpoints=ckpts or [],
                mode=mode,
                session_id=_session(request),
                progress=_progress(progress),
            )
            return arena_out(state, view)

        a_next.click(
            on_arena_next,
            [user, a_prompt, a_set, a_k, a_source, a_mode, a_ckpts],
            arena_outputs,
            api_name="arena_next",
            concurrency_id="generate",
            concurrency_limit=1,
        )

        def arena_key(key: str) -> Callable[..., Any]:
            @_guard
            def handler(name, state: ArenaState, request: gr.Request):
                state, view = act(
                    ctx, state, user=_user(name, request), key=key, session_id=_session(request)
                )
                return arena_out(state, view)

            return handler

        for (suffix, key, _), btn in zip(BUTTONS, a_buttons):
            btn.click(arena_key(key), [user, a_state], arena_outputs, api_name=f"arena_{suffix}")

        curate_outputs = [u_state, *u_images, *u_buttons[2:4], u_status, u_reveal, u_shown, u_table]

        def curate_out(state: CurateState, view: RoundView | None) -> list[Any]:
            table = [
                [im.params.get("source_file", ""), round(rate, 3), n, im.prompt[:80]]
                for im, rate, n in curate_ranking(state)
            ]
            return [
                state,
                *_image_updates(view),
                *_button_updates(view),
                state.arena.message,
                view.reveal if view else "",
                f"**prompt:** {view.prompt}" if view else gr.update(),
                table,
            ]

        @_guard
        def on_load(folder, prompt, strategy):
            state, summary = load_folder(ctx, folder, prompt, strategy=strategy)
            return state, summary

        u_load.click(on_load, [u_folder, u_prompt, u_strategy], [u_state, u_summary], api_name="curate_load")

        @_guard
        def on_curate_next(name, state: CurateState, k, mode, prompt, request: gr.Request):
            state, view = new_curate_round(
                ctx,
                state,
                user=_user(name, request),
                k=k,
                mode=mode,
                typed_prompt=prompt,
                session_id=_session(request),
            )
            return curate_out(state, view)

        u_next.click(
            on_curate_next, [user, u_state, u_k, u_mode, u_prompt], curate_outputs, api_name="curate_next"
        )

        def curate_key(key: str) -> Callable[..., Any]:
            @_guard
            def handler(name, state: CurateState, request: gr.Request):
                state, view = curate_act(
                    ctx, state, user=_user(name, request), key=key, session_id=_session(request)
                )
                return curate_out(state, view)

            return handler

        for (suffix, key, _), btn in zip(BUTTONS, u_buttons):
            btn.click(curate_key(key), [user, u_state], curate_outputs, api_name=f"curate_{suffix}")

        @_guard
        def on_stats(only):
            return stats_text(ctx, user=(only or "").strip() or None)

        v_stats_btn.click(on_stats, [v_user], v_stats, api_name="stats")

        @_guard
        def on_export(only):
            summary, parquet = export(ctx, user=(only or "").strip() or None)
            return f"```\n{summary}\n```", str(parquet)

        v_export_btn.click(on_export, [v_user], [v_export, v_file], api_name="export")

        @_guard
        def vote(
            user_name: str,
            round_id: str,
            outcome: str,
            ranking: list[int],
            idempotency_key: str,
            latency_ms: int | None = None,
            request: gr.Request = None,  # pyright: ignore[reportArgumentType] (Gradio injects it)
        ) -> dict[str, Any]:
            """Store one vote on a round shown to this user: outcome best | rank | tie | both_bad | skip, ranking
            = slots best-first, idempotency_key = a new random id per decision, resent unchanged on every retry
            (a retried vote is stored once; see apps.handlers.submit_vote)."""
            return submit_vote(
                ctx,
                user=_user(user_name, request),
                round_id=round_id,
                outcome=outcome,
                ranking=ranking,
                idempotency_key=idempotency_key,
                latency_ms=latency_ms,
                session_id=_session(request),
            )

        gr.api(vote, api_name="vote")
    return demo


def _vote_panel(prefix: str) -> tuple[list[Any], list[Any], Any, Any, Any, Any]:
    """K image slots (2 x 2), the vote buttons with their shortcut on the label, Next, and status lines."""
    shown = gr.Markdown()
    images = []
    for row in range(2):
        with gr.Row():
            for col in range(2):
                i = 2 * row + col
                images.append(
                    gr.Image(
                        label=f"{i + 1}",
                        interactive=False,
                        format="png",  # exact pixels (the default webp is lossy)
                        height=256,
                        visible=i < 2,
                        elem_id=f"{prefix}-image-{i + 1}",
                        elem_classes=["vote-image"],
                        buttons=["fullscreen"],
                    )
                )
    with gr.Row():
        buttons = [
            gr.Button(label, elem_id=f"{prefix}-{suffix}", visible=suffix not in ("3", "4"), size="sm")
            for suffix, _, label in BUTTONS
        ]
    nxt = gr.Button("Next round [n / Space]", variant="primary", elem_id=f"{prefix}-next")
    status = gr.Markdown(elem_id=f"{prefix}-status")
    reveal = gr.Markdown(elem_id=f"{prefix}-reveal")
    return images, buttons, nxt, status, reveal, shown


def _samplers() -> list[str]:
    from samplers import SAMPLERS

    return list(SAMPLERS)


def launch(
    ctx: AppContext,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    auth: list[tuple[str, str]] | None = None,
    block: bool = True,
) -> tuple[gr.Blocks, str]:
    """Queue and launch the app (never with a share link); returns the Blocks and its local URL."""
    demo = build_app(ctx)
    demo.queue(default_concurrency_limit=4, max_size=64)
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        auth=auth or None,
        auth_message="Log in: your votes are stored under your user name." if auth else None,
        prevent_thread_lock=not block,
        show_error=True,
        quiet=not block,
        head=SHORTCUTS_JS,
        css=CSS,
        footer_links=["api", "settings"],
        run_history=False,
        ssr_mode=False,
        inbrowser=False,
    )
    return demo, url
