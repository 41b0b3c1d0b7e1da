"""Concept forgetting on a tiny random StableDiffusionPipeline built here from configs (a VAE, a CLIP text
encoder and a CLIP tokenizer made from a small local vocabulary: nothing from a hub): the run, its
reloadable generator, the mask fraction, sampling by prompt, resuming, fp16 and gradient checkpointing,
and the options refused before any output."""

import json
import math
import os
import re
import signal

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from pecker_kernels.cli import main
from pecker_kernels.unlearn.concept import ConceptConfig, ConceptDistiller
from pecker_kernels.unlearn.concept_cli import unlearn_parser
from pecker_kernels.unlearn.text import clip_tokenizer, load_pipeline

from .torchrun import torchrun

WORDS = ("a", "photo", "of", "cat", "dog", "tree", "house", "painting")


@pytest.fixture(scope="session")
def sd_pipeline(tmp_path_factory):
    """A random StableDiffusionPipeline: 16x16 RGB images, 4x8x8 latents, cross-attention on 16-d text."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sd")
    tokenizer = clip_tokenizer(root / "vocab", WORDS, max_length=8)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer.get_vocab()),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    )
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = root / "tiny-sd"
    pipe.save_pretrained(folder)
    (root / "retain.txt").write_text("a photo of a tree\n# a comment\n\na house\n")
    return folder


FAST = [
    "--forget-prompt", "a photo of a cat", "--anchor-prompt", "a photo of a dog", "--steps", "4",
    "--batch", "2", "--forget-batch", "2", "--mask-batches", "1", "--samples", "2", "--cfg", "2",
    "--cfg-fake", "1.5", "--lr", "1e-3", "--lr-pseudo", "1e-3", "--device", "cpu", "--no-progress",
]  # fmt: skip


def weights(out):
    return load_file(out / "generator" / "diffusion_pytorch_model.safetensors")


def test_run_keeps_a_reloadable_generator_moved_at_most_the_ratio_and_samples_by_prompt(
    sd_pipeline, tmp_path
):
    out = tmp_path / "run"
    retain = str(sd_pipeline.parent / "retain.txt")
    argv = ["unlearn", "--model", str(sd_pipeline), *FAST, "--retain-prompts", retain, "--ratio", "0.3"]
    assert main([*argv, "--out", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "done" and record["recipe"] == "concept" and not (out / "checkpoint").exists()
    assert record["concept_config"]["retain_prompts"] == ["a photo of a tree", "a house"]
    assert record["generator"]["latent_shape"] == [4, 8, 8] and record["generator"]["t_init"] == 625
    metrics = json.loads((out / "metrics.json").read_text())
    n = metrics["generator_parameters"]
    assert round(metrics["updated_fraction"] * n) == math.floor(0.3 * n)
    assert all(
        math.isfinite(v) for v in json.loads((out / "history.json").read_text())["train"]["loss_generator"]
    )

    generator = UNet2DConditionModel.from_pretrained(out / "generator")
    teacher = UNet2DConditionModel.from_pretrained(sd_pipeline / "unet")
    moved = sum(
        int((p != t).sum()) for p, t in zip(generator.parameters(), teacher.parameters(), strict=True)
    )
    assert 0 < moved <= math.floor(0.3 * n)  # only the one-shot mask's weights (and their EMA) moved

    grid, tensor = tmp_path / "cat.png", tmp_path / "cat.pt"
    argv = ["sample", "--run", str(out), "--prompt", "a photo of a cat", "-n", "3", "--out", str(grid)]
    assert main([*argv, "--tensor", str(tensor)]) == 0
    assert grid.read_bytes()[:4] == b"\x89PNG"
    images = torch.load(tensor)
    assert images.shape == (3, 3, 16, 16) and images.abs().max() <= 1  # decoded by the pipeline's VAE
    for png in ("samples_before.png", "samples_after.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="is a concept-forgetting run: sample it with --prompt"):
        main(["sample", "--run", str(out), "--class", "0", "--out", str(grid)])


def test_interrupted_run_resumes_bit_identical(sd_pipeline, tmp_path, monkeypatch):
    argv = ["unlearn", "--model", str(sd_pipeline), *FAST, "--refresh-every", "2", "--steps", "3"]
    whole = tmp_path / "whole"
    assert main([*argv, "--out", str(whole)]) == 0

    real_step = ConceptDistiller.train_step

    def signal_at_step_2(self):
        real_step(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    cut = tmp_path / "cut"
    monkeypatch.setattr(ConceptDistiller, "train_step", signal_at_step_2)
    assert main([*argv, "--out", str(cut)]) == 128 + signal.SIGINT
    assert json.loads((cut / "run.json").read_text())["status"] == "interrupted"
    assert json.loads((cut / "checkpoint" / "checkpoint.json").read_text())["step"] == 2
    monkeypatch.setattr(ConceptDistiller, "train_step", real_step)
    assert main(["unlearn", "--resume", str(cut), "--no-progress"]) == 0
    expected, got = weights(whole), weights(cut)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    history = json.loads((whole / "history.json").read_text())
    assert json.loads((cut / "history.json").read_text()) == history
    with pytest.raises(SystemExit, match="is finished; nothing to resume"):
        main(["unlearn", "--resume", str(cut)])


def test_resume_refuses_every_option_the_recorded_run_would_ignore(sd_pipeline, tmp_path, monkeypatch):
    real_step = ConceptDistiller.train_step

    def signal_at_step_1(self):
        real_step(self)
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    cut = tmp_path / "cut"
    monkeypatch.setattr(ConceptDistiller, "train_step", signal_at_step_1)
    argv = ["unlearn", "--model", str(sd_pipeline), *FAST, "--steps", "2", "--out", str(cut)]
    assert main(argv) == 128 + signal.SIGINT
    monkeypatch.setattr(ConceptDistiller, "train_step", real_step)
    before = (cut / "run.json").read_text()
    extra = ["--steps", "7", "--cfg", "3", "--lr", "0.5", "--threads", "2", "--gradient-checkpointing"]
    with pytest.raises(SystemExit, match=r"drop --steps, --lr, --cfg, --gradient-checkpointing, --threads$"):
        main(["unlearn", "--resume", str(cut), *extra])
    for option in (
        ["--forget-prompt", "a photo of a tree"],
        ["--model", str(sd_pipeline)],
        ["--distributed"],
    ):
        with pytest.raises(SystemExit, match=rf"drop {option[0]}$"):
            main(["unlearn", "--resume", str(cut), *option])
    assert (cut / "run.json").read_text() == before  # refused before the run was touched
    # How progress shows, and the run's own folder as --out, change nothing: accepted.
    assert main(["unlearn", "--resume", str(cut), "--out", str(cut), "--no-progress"]) == 0
    assert json.loads((cut / "run.json").read_text())["status"] == "done"


def _listed(text, flag):
    """Whether ``flag`` starts an option's entry in a --help text (not merely a prefix of another)."""
    return re.search(rf"^  {re.escape(flag)}(?=[ ,\n])", text, re.MULTILINE) is not None


def test_unlearn_help_lists_the_options_of_both_modes(sd_pipeline, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["unlearn", "--help"])
    assert stopped.value.code == 0
    text = capsys.readouterr().out
    concept = [a.option_strings[0] for a in unlearn_parser()._actions if a.option_strings[0] != "-h"]
    named = [
        "--forget-prompt", "--forget-prompts", "--anchor-prompt", "--retain-prompts", "--cfg", "--cfg-fake",
        "--init-timestep", "--precision", "--gradient-checkpointing", "--distributed",
    ]  # fmt: skip
    section = text.split("concept-forgetting options:")[-1]
    missing = [f for f in [*named, *concept] if not _listed(section, f)]
    assert not missing, f"unlearn --help does not list the concept options {missing}"
    assert all(_listed(text, f) for f in ("--forget", "--compare", "--dataset", "--null-class"))
    assert "StableDiffusionPipeline" in text and "fp16" in text
    # A concept command line's own help: the concept options, and where the class options are.
    with pytest.raises(SystemExit):
        main(["unlearn", "--model", str(sd_pipeline), "--help"])
    text = capsys.readouterr().out
    assert _listed(text, "--anchor-prompt") and not _listed(text, "--compare")
    assert "class forgetting (a class-conditional model)" in " ".join(text.split())


def _torchrun(nproc, argv, out):
    proc = torchrun(nproc, [*argv, "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_distributed_run_shards_the_generator_and_masks_one_global_fraction(sd_pipeline, tmp_path):
    argv = ["unlearn", "--model", str(sd_pipeline), *FAST, "--steps", "3", "--ratio", "0.3", "--distributed"]
    out = tmp_path / "two-ranks"
    _torchrun(2, argv, out)
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "done" and record["concept_config"]["distributed"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3
    # One selection over both ranks' shards: exactly floor(0.3 N) of the N generator weights.
    n = metrics["generator_parameters"]
    assert round(metrics["updated_fraction"] * n) == math.floor(0.3 * n)
    generator = UNet2DConditionModel.from_pretrained(out / "generator")
    teacher = UNet2DConditionModel.from_pretrained(sd_pipeline / "unet")
    moved = sum(
        int((p != t).sum()) for p, t in zip(generator.parameters(), teacher.parameters(), strict=True)
    )
    assert 0 < moved <= math.floor(0.3 * n)  # both ranks stepped the same one-shot mask's weights
    history = json.loads((out / "history.json").read_text())["train"]
    assert len(history["loss_generator"]) == 3 and all(math.isfinite(v) for v in history["loss_generator"])
    for png in ("samples_before.png", "samples_after.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    (out / "run.json").write_text(json.dumps({**record, "status": "interrupted"}))
    with pytest.raises(SystemExit, match="--distributed runs keep no checkpoints: they cannot be resumed"):
        main(["unlearn", "--resume", str(out)])


@pytest.mark.parametrize(
    "extra",
    [
        ["--mask-batches", "2", "--gradient-checkpointing"],  # one-shot mask: clipped over the shards
        ["--refresh-every", "2", "--precision", "bf16"],  # reselected on the shards, under autocast
    ],
    ids=["one-shot-checkpointing", "refresh-bf16"],
)
def test_a_one_rank_distributed_run_gives_the_single_process_generator(sd_pipeline, tmp_path, extra):
    """Under torchrun with one rank the FSDP2 path (sharded networks, mask and EMA over DTensors, the
    gathered EMA saved) must reproduce the plain run exactly: the same weights, the same losses."""
    argv = ["unlearn", "--model", str(sd_pipeline), *FAST, "--steps", "3", *extra]
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert main([*argv, "--out", str(single)]) == 0
    _torchrun(1, [*argv, "--distributed"], sharded)
    assert json.loads((sharded / "metrics.json").read_text())["world_size"] == 1
    expected, got = weights(single), weights(sharded)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    losses = [json.loads((f / "history.json").read_text())["train"] for f in (single, sharded)]
    assert losses[1] == losses[0]


def _distiller(folder, **overrides):
    config = ConceptConfig(
        model=str(folder),
        forget_prompts=["a photo of a cat"],
        anchor_prompt="a photo of a dog",
        batch=2,
        forget_batch=2,
        mask_batches=1,
        samples=1,
        cfg=2.0,
        cfg_fake=2.0,
        **overrides,
    )
    config.validate()
    return ConceptDistiller(config, load_pipeline(folder, with_vae=False))


def test_gradient_checkpointing_gives_the_same_generator_gradient(sd_pipeline):
    grads = []
    for checkpointing in (False, True):
        d = _distiller(sd_pipeline, gradient_checkpointing=checkpointing)
        assert d.generator.net.unet.is_gradient_checkpointing == checkpointing
        d.generator_loss(*d._batch()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in d.gen_params]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_generator_starts_from_the_init_folder_and_the_pseudo_score_from_the_teacher(sd_pipeline, tmp_path):
    start = UNet2DConditionModel.from_pretrained(sd_pipeline / "unet")
    with torch.no_grad():
        for p in start.parameters():
            p.add_(0.01)
    start.save_pretrained(tmp_path / "one-step")
    d = _distiller(sd_pipeline, init=str(tmp_path / "one-step"))
    want = start.state_dict()
    for net in (d.generator.net.unet, d.eval_generator.net.unet):
        assert all(torch.equal(v, want[k]) for k, v in net.state_dict().items())
    teacher = d.teacher.unet.state_dict()
    assert all(torch.equal(v, teacher[k]) for k, v in d.pseudo.unet.state_dict().items())
    assert not torch.equal(next(d.generator.net.parameters()), next(d.pseudo.parameters()))


def test_an_init_folder_of_another_architecture_is_refused(sd_pipeline, tmp_path):
    config = UNet2DConditionModel.load_config(sd_pipeline / "unet")
    other = UNet2DConditionModel.from_config({**config, "block_out_channels": (8, 8)})
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="does not have the pipeline UNet's architecture"):
        _distiller(sd_pipeline, init=str(tmp_path / "other"))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_steps_under_autocast_and_keep_fp32_master_weights(sd_pipeline, precision):
    d = _distiller(sd_pipeline, precision=precision, refresh_every=1, lr_generator=1e-3, ratio=0.25)
    assert d.scaler_g.is_enabled() == (precision == "fp16")
    before = [p.detach().clone() for p in d.gen_params]
    d.setup()
    while d.step < 8 and (d.step < 2 or all(d.history["skipped"])):  # fp16: the scaler's first steps may skip
        d.train_step()
    assert not all(d.history["skipped"])
    assert all(p.dtype == torch.float32 for p in d.gen_params)
    assert next(d.teacher.parameters()).dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    moved = sum(int((p != b).sum()) for p, b in zip(d.gen_params, before, strict=True))
    total = sum(p.numel() for p in d.gen_params)
    assert 0 < moved <= d.step * math.floor(0.25 * total)  # a reselected mask per step at most
    assert all(math.isfinite(v) for v in d.history["loss_generator"] + d.history["loss_pseudo"])
    state = d.state_dict()
    assert ("scale" in state["scaler_g"]) == (precision == "fp16")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--anchor-prompt", "a photo of a cat"], "is also a forget prompt"),
        (["--precision", "fp8"], "--precision must be one of"),
        (["--distributed", "--precision", "fp16"], "--distributed runs in fp32 or bf16"),
        (["--distributed"], "--distributed runs under torchrun"),
        (["--cfg", "0.5"], "--cfg must be >= 1"),
        (["--init-timestep", "1000"], "--init-timestep"),
        (["--eval-prompts", "missing.json"], "--eval-prompts missing.json"),
        (["--init", "missing-folder"], "--init missing-folder: not a UNet2DConditionModel folder"),
    ],
)
def test_bad_options_are_refused_before_any_output(sd_pipeline, tmp_path, monkeypatch, extra, message):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(ConceptDistiller, "__init__", lambda *a: pytest.fail("built"))
    out = tmp_path / "never"
    with pytest.raises(SystemExit, match=message):
        main(["unlearn", "--model", str(sd_pipeline), *FAST, *extra, "--out", str(out)])
    assert not out.exists()


def test_forget_prompts_on_a_class_conditional_model_are_refused(concat_pipeline, tmp_path):
    with pytest.raises(SystemExit, match="is not a text-conditioned pipeline folder"):
        main(["unlearn", "--model", str(concat_pipeline), *FAST, "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
