"""The app's handlers called directly (no Gradio): rounds, keys, undo, validation, curation, metadata."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from app_fixtures import A1111_PARAMETERS, COMFYUI_GRAPH, FakeRenderer, write_curate_folder

from apps.handlers import (
    AppContext,
    AppSettings,
    ArenaState,
    CuratedImage,
    CurateState,
    InputError,
    act,
    add_checkpoint,
    check_user,
    compare,
    curate_act,
    discover_checkpoints,
    for_display,
    grid_png,
    load_folder,
    load_settings,
    new_curate_round,
    new_round,
    pick_group,
)
from apps.metadata import parse_a1111, parse_comfyui, read_metadata


@pytest.fixture()
def ctx(tmp_path: Path) -> AppContext:
    settings = AppSettings(db=str(tmp_path / "votes.sqlite"), runs_dir=None, seed=0, scorers=[])
    return AppContext(settings, renderer=FakeRenderer(["base", "tuned", "run@100", "run@200"]))


def _round(ctx: AppContext, **kw) -> tuple[ArenaState, object]:
    args = dict(
        user="alice", prompt="a red circle", prompt_set=None, k=2, source="seeds", checkpoints=["base"]
    )
    return new_round(ctx, ArenaState(), **(args | kw))


def test_seed_rounds_show_one_checkpoint_and_log_the_shuffle(ctx: AppContext):
    state, view = _round(ctx, k=4)
    rnd = ctx.store.get_round(state.round_id)
    assert rnd.k == 4 and not rnd.blind and len({i.params["seed"] for i in rnd.items}) == 4
    assert {i.params["checkpoint"] for i in rnd.items} == {"base"}
    assert sorted(rnd.display_order) == [0, 1, 2, 3]
    for pos, item in enumerate(rnd.shown()):  # the UI's image at position pos is slot display_order[pos]
        rendered = ctx.renderer.render("base", ["a red circle"], [item.params["seed"]], _cfg())[0]
        assert (view.images[pos] == for_display(rendered)).all()
        assert view.images[pos].shape == (256, 256, 3)  # 16 px shown 16x larger, pixel for pixel
        assert f"seed {item.params['seed']}" in view.labels[pos]
    assert {"sampler", "steps", "guidance", "width", "height", "checkpoint_hash"} <= set(rnd.items[0].params)


def _cfg():
    from samplers import SamplingConfig

    return SamplingConfig(steps=10, guidance=5.0)


def test_blind_rounds_share_noise_and_hide_names_until_the_vote(ctx: AppContext):
    state, view = _round(ctx, k=4, source="checkpoints", checkpoints=["base", "tuned", "run@100", "run@200"])
    rnd = ctx.store.get_round(state.round_id)
    assert rnd.blind and len({i.params["seed"] for i in rnd.items}) == 1  # identical initial noise
    assert sorted(i.params["checkpoint"] for i in rnd.items) == ["base", "run@100", "run@200", "tuned"]
    assert all("hidden" in label for label in view.labels) and view.reveal == ""
    state, view = act(ctx, state, user="alice", key="3")
    assert "stored vote" in state.message
    assert all(name in view.reveal for name in ("base", "tuned", "run@100", "run@200"))
    vote = ctx.store.votes()[-1]
    assert vote.ranking == [rnd.display_order[2]] and vote.latency_ms is not None
    with pytest.raises(InputError, match="need 4 checkpoints"):
        _round(ctx, k=4, source="checkpoints", checkpoints=["base", "tuned"])


def test_keys_vote_once_undo_and_revote(ctx: AppContext):
    state, _ = _round(ctx)
    voted, _ = act(ctx, state, user="alice", key="1")
    again, _ = act(ctx, state, user="alice", key="1")  # the same submit retried from the same state
    assert again.last_vote_id == voted.last_vote_id and "already stored" in again.message
    assert ctx.store.counts()["votes"] == 1
    blocked, _ = act(ctx, voted, user="alice", key="2")
    assert "already voted" in blocked.message
    undone, view = act(ctx, voted, user="alice", key="u")
    assert undone.round_id == state.round_id and view is not None and "undid vote" in undone.message
    revoted, _ = act(ctx, undone, user="alice", key="2")
    assert ctx.store.counts() == {"images": 2, "rounds": 1, "votes": 2, "undos": 1, "active_votes": 1}
    (active,) = ctx.store.votes()
    assert active.vote_id == revoted.last_vote_id
    nothing, _ = act(ctx, ArenaState(), user="bob", key="u")
    assert nothing.message == "nothing to undo"
    for key, outcome in (("t", "tie"), ("b", "both_bad"), ("s", "skip")):
        s, _ = _round(ctx)
        act(ctx, s, user="alice", key=key)
        assert ctx.store.votes()[-1].outcome == outcome


def test_rank_mode_takes_k_minus_one_presses_in_display_positions(ctx: AppContext):
    state, _ = _round(ctx, k=4, mode="rank")
    rnd = ctx.store.get_round(state.round_id)
    for key in ("3", "1"):
        state, _ = act(ctx, state, user="alice", key=key)
        assert not state.voted
    state, _ = act(ctx, state, user="alice", key="3")  # pressed twice: refused, not stored
    assert "already ranked" in state.message
    state, _ = act(ctx, state, user="alice", key="u")  # undo inside a ranking removes the last press
    assert state.pending_rank == [2]
    for key in ("1", "4"):
        state, _ = act(ctx, state, user="alice", key=key)
    assert state.voted
    d = rnd.display_order
    assert ctx.store.votes()[-1].ranking == [d[2], d[0], d[3], d[1]]


def test_compare_renders_every_checkpoint_on_the_same_seeds(ctx: AppContext, tmp_path: Path):
    prompt, cells = compare(ctx, ["base", "tuned"], "a red circle", "0-2", guidance_sweep="1,5")
    assert prompt == "a red circle" and len(cells) == 2 * 2 * 3
    assert [(c.checkpoint, c.guidance, c.seed) for c in cells[:3]] == [
        ("base", 1.0, 0),
        ("base", 1.0, 1),
        ("base", 1.0, 2),
    ]
    grid = grid_png(cells, tmp_path / "grid.png", columns=3)
    from PIL import Image

    assert Image.open(grid).size == (3 * 18 + 2, 4 * 18 + 2)


def test_compare_scores_each_image(tmp_path: Path):
    settings = AppSettings(db=str(tmp_path / "v.sqlite"), runs_dir=None, seed=0)
    ctx = AppContext(settings, renderer=FakeRenderer())
    _, cells = compare(ctx, ["base"], "a red circle on a white background", "0,1", scorers=["toy/saturation"])
    assert all(set(c.scores) == {"toy/saturation"} for c in cells)
    assert "toy/saturation" in cells[0].caption()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(prompt="x" * 501), "limit is 500"),
        (dict(k=3), "2 or 4"),
        (dict(prompt="", prompt_set=None), "type a prompt"),
        (dict(prompt="", prompt_set="no_such_set.txt"), "prompt set"),
        (dict(steps=0), "steps must be between"),
        (dict(mode="pairs"), "mode must be"),
        (dict(checkpoints=["nope"]), "not loaded"),
    ],
)
def test_bad_input_gets_a_message(ctx: AppContext, kwargs, message):
    ctx.renderer = _StrictFake()
    with pytest.raises(InputError, match=message):
        _round(ctx, **kwargs)


class _StrictFake(FakeRenderer):
    def render(self, name, prompts, seeds, cfg, progress=None):
        if name not in self._names:
            raise InputError(f"checkpoint {name!r} is not loaded")
        return super().render(name, prompts, seeds, cfg, progress)


def test_seeds_users_and_settings_are_validated(ctx: AppContext, tmp_path: Path):
    with pytest.raises(InputError, match="seeds"):
        compare(ctx, ["base"], "p", "0-x")
    with pytest.raises(InputError, match="at most 16"):
        compare(ctx, ["base"], "p", "0-40")
    assert check_user("  bob ", None) == "bob"
    assert check_user("mallory", "alice") == "alice"  # logged in: the typed name cannot override the login
    with pytest.raises(InputError, match="enter your name"):
        check_user("", None)
    cfg = tmp_path / "app.yaml"
    cfg.write_text("steps: 4\nscorers: [toy/fidelity]\n")
    assert load_settings(cfg, db="x.sqlite").steps == 4
    cfg.write_text("stepz: 4\n")
    with pytest.raises(InputError, match="unknown app setting"):
        load_settings(cfg)


def test_training_runs_are_discovered_with_their_steps(tmp_path: Path):
    run = tmp_path / "runs" / "demo" / "train"  # where `workbench demo` trains
    (run / "final" / "lora").mkdir(parents=True)
    (run / "final" / "COMPLETE").write_text("")
    (run / "checkpoints" / "step_000100").mkdir(parents=True)
    other = tmp_path / "runs" / "toy_dpo" / "checkpoints" / "step_000050"  # unfinished: steps only
    other.mkdir(parents=True)
    specs = discover_checkpoints(tmp_path / "runs")
    assert specs == [
        f"demo={run / 'final'}",
        f"demo@100={run / 'checkpoints' / 'step_000100'}",
        f"toy_dpo@50={other}",
    ]
    assert discover_checkpoints(tmp_path / "missing") == []


# ---------------------------------------------------------------------------------------------------- metadata
def test_a1111_parameters_are_parsed():
    meta = parse_a1111(A1111_PARAMETERS)
    assert meta.prompt == "a red circle on a white background, masterpiece"
    assert meta.negative_prompt == "blurry, lowres"
    assert (meta.seed, meta.steps, meta.guidance) == (1234, 20, 7.0)
    assert meta.sampler == "DPM++ 2M (Karras)"
    assert (meta.checkpoint, meta.checkpoint_hash, meta.width, meta.height) == (
        "v1-5-pruned-emaonly",
        "6ce0161689",
        32,
        32,
    )
    bare = parse_a1111("just a prompt")  # no settings line: the whole text is the prompt
    assert bare.prompt == "just a prompt" and bare.seed is None


def test_comfyui_graph_is_followed_through_links():
    meta = parse_comfyui(COMFYUI_GRAPH)
    assert meta.prompt == "a red circle on a white background"
    assert meta.negative_prompt == "ugly, watermark"
    assert (meta.seed, meta.steps, meta.guidance, meta.sampler) == (987654321, 25, 6.5, "euler (normal)")
    assert meta.checkpoint == "sd_xl_base_1.0.safetensors" and (meta.width, meta.height) == (32, 32)
    assert parse_comfyui({"1": {"class_type": "SaveImage", "inputs": {}}}).notes


def test_folder_metadata_is_read_from_png_chunks_and_sidecars(tmp_path: Path):
    files = write_curate_folder(tmp_path / "imgs")
    assert read_metadata(files["comfy0"]).format == "comfyui"
    assert read_metadata(files["a1111_1"]).seed == 1235
    side = read_metadata(files["sidecar"])
    assert (side.format, side.prompt) == ("sidecar", "a blue square on a black background")
    assert read_metadata(files["bare"]).prompt is None
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(
        "invokeai_metadata",
        json.dumps({"positive_prompt": "a cat", "seed": 5, "cfg_scale": 4.5, "model": {"name": "sdxl"}}),
    )
    Image.new("RGB", (8, 8)).save(tmp_path / "invoke.png", pnginfo=info)
    meta = read_metadata(tmp_path / "invoke.png")
    assert (meta.format, meta.prompt, meta.seed, meta.guidance, meta.checkpoint) == (
        "invokeai",
        "a cat",
        5,
        4.5,
        "sdxl",
    )


# ------------------------------------------------------------------------------------------------------- curate
def test_curate_imports_a_folder_and_votes_in_pairs(ctx: AppContext, tmp_path: Path):
    write_curate_folder(tmp_path / "imgs")
    state, summary = load_folder(ctx, str(tmp_path / "imgs"), "a typed prompt")
    assert (
        len(state.images) == 6 and "comfyui 2" in summary and "a1111 2" in summary and "sidecar 1" in summary
    )
    by_file = {im.params["source_file"]: im for im in state.images}
    assert by_file["bare.png"].prompt == "a typed prompt"
    assert by_file["a1111/00001-1235.png"].params["seed"] == 1235
    for _ in range(3):
        state, view = new_curate_round(ctx, state, user="alice", k=2)
        assert len(view.images) == 2
        state, _ = curate_act(ctx, state, user="alice", key="1")
    assert sum(state.compared.values()) == 6 and len(state.seen_pairs) == 3
    own = {im.sha256: im.prompt for im in state.images}
    for vote in ctx.store.votes():  # a round's prompt is its first image's own; the typed one only fills gaps
        assert vote.round.prompt == own[vote.round.items[0].sha256]
    assert ctx.store.counts()["active_votes"] == 3
    state, _ = curate_act(ctx, state, user="alice", key="u")  # undo recounts from the store
    assert sum(state.compared.values()) == 4
    rounds = [v.round for v in ctx.store.votes()]
    assert all(r.source == "curate" for r in rounds)
    served = {Path(i.path).resolve() for r in rounds for i in r.items}
    assert all(p.is_relative_to(ctx.store.image_dir.resolve()) for p in served)  # shown from the store only


def test_curate_folders_are_confined(ctx: AppContext, tmp_path: Path):
    write_curate_folder(tmp_path / "root" / "mine")
    (tmp_path / "outside").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "outside" / "secret.png")
    (tmp_path / "root" / "mine" / "link.png").symlink_to(tmp_path / "outside" / "secret.png")
    ctx.settings.curate_root = str(tmp_path / "root")
    state, _ = load_folder(ctx, str(tmp_path / "root" / "mine"))
    assert "link.png" not in {im.params["source_file"] for im in state.images}  # a symlink out is not read
    with pytest.raises(InputError, match="outside the allowed root"):
        load_folder(ctx, str(tmp_path / "outside"))
    with pytest.raises(InputError, match="outside the allowed root"):
        load_folder(ctx, str(tmp_path / "root" / "mine" / ".." / ".." / "outside"))
    with pytest.raises(InputError, match="does not exist"):
        load_folder(ctx, str(tmp_path / "nope"))


def _images(n: int, prompt: str = "p") -> list[CuratedImage]:
    return [CuratedImage(f"{i:064x}", prompt, {}) for i in range(n)]


def test_swiss_pairing_avoids_repeats_until_it_must():
    state = CurateState(images=_images(6), strategy="swiss")
    rng = random.Random(0)
    seen = set()
    for _ in range(15):  # C(6, 2) = 15 distinct pairs before any repeat
        a, b = pick_group(state, 2, rng)
        pair = tuple(sorted((a.sha256, b.sha256)))
        assert pair not in seen
        seen.add(pair)
        state.seen_pairs.add(pair)
        for im in (a, b):
            state.compared[im.sha256] = state.compared.get(im.sha256, 0) + 1
        state.wins[a.sha256] = state.wins.get(a.sha256, 0) + 1


def test_winner_stays_keeps_the_last_winner():
    state = CurateState(images=_images(5), strategy="winner_stays")
    rng = random.Random(0)
    state.last_winner = state.images[3].sha256
    group = pick_group(state, 2, rng)
    assert group[0].sha256 == state.images[3].sha256
    mixed = CurateState(images=[*_images(3, "cats"), *_images(3, "dogs")[::-1]])
    mixed.images = [CuratedImage(f"{i:064x}", p, {}) for i, p in enumerate(["cats"] * 3 + ["dogs"] * 3)]
    for _ in range(5):
        g = pick_group(mixed, 2, rng)
        assert g[0].prompt == g[1].prompt  # same prompt first when the folder allows it


def test_checkpoints_added_in_the_ui_are_validated(ctx: AppContext, tmp_path: Path):
    lora = tmp_path / "run" / "final" / "lora"
    lora.mkdir(parents=True)
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert add_checkpoint(ctx, f"mine={tmp_path / 'run'}") == "mine"  # a run directory resolves to final/lora
    assert "mine" in ctx.renderer.names()
    with pytest.raises(InputError, match="already there"):
        add_checkpoint(ctx, f"mine={lora}")
    with pytest.raises(InputError, match="does not exist"):
        add_checkpoint(ctx, "x=/no/such/lora")
    with pytest.raises(InputError, match="NAME=PATH"):
        add_checkpoint(ctx, "  ")


def test_auth_pairs_are_parsed_strictly():
    from workbench.commands.app import parse_auth

    assert parse_auth(["alice:pw", "bob:a:b"]) == [("alice", "pw"), ("bob", "a:b")]
    for bad in ("alice", "alice:", ":pw"):
        with pytest.raises(ValueError, match="USER:PASS"):
            parse_auth([bad])
