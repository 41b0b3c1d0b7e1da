"""The digits-with-captions teacher (train_text): its tokenizer gives every caption word a token of its own,
its UNet cross-attends in every block, the text encoder is trained with it, the conditioning probe sees a
UNet that ignores its prompt, caption following is reported per prompt for both template groups, the saved
pipeline reloads with the same prompt encoding, and the packaged teacher's guided samples are labelled as
their captions' digits. Tiny networks and a few steps only; the packaged teacher is only sampled."""

import torch
from diffusers import UNet2DConditionModel

from pecker_kernels.unlearn import checkpoints
from pecker_kernels.unlearn.data import Dataset
from pecker_kernels.unlearn.diffusion import Schedule
from pecker_kernels.unlearn.models import Classifier
from pecker_kernels.unlearn.text import (
    PromptEncoder,
    TextEpsNet,
    clip_tokenizer,
    inspect_pipeline,
    load_pipeline,
)
from pecker_kernels.unlearn.train_text import (
    HELDOUT_TEMPLATES,
    NAMES,
    TRAIN_TEMPLATES,
    build_text_model,
    caption_following,
    conditioning_report,
    guided_ddim,
    prompt,
    save_text_pipeline,
    text_unet_config,
    token_report,
    train_text_teacher,
    vocabulary,
)

TINY = text_unet_config(width=(8, 16), head_width=8, text_dim=32)


def tiny_data(n=40):
    g = torch.Generator().manual_seed(0)
    images = torch.rand((n, 1, 8, 8), generator=g) * 2 - 1
    return Dataset("digits", images, torch.arange(n) % 10, tuple(str(i) for i in range(10)))


def test_every_caption_word_is_one_known_token_and_the_digit_names_differ(tmp_path):
    tokenizer, _ = build_text_model(tmp_path)
    report = token_report(tokenizer)
    assert report["unknown_words"] == [] and report["words_split_into_several_tokens"] == []
    assert report["digit_names_distinct_tokens"] and report["words"] == len(vocabulary())
    ids = {tokenizer(n).input_ids[1] for n in NAMES}
    assert len(ids) == 10 and tokenizer.unk_token_id not in ids


def test_token_report_names_words_the_vocabulary_lacks(tmp_path):
    tokenizer = clip_tokenizer(tmp_path, ["one", "two"])  # letters only: "three" splits, "x-ray" has '-'
    report = token_report(tokenizer, ["one", "two", "three", "x-ray"])
    assert report["words_split_into_several_tokens"] == ["three", "x-ray"]
    assert report["unknown_words"] == ["x-ray"]  # '-' is not in the vocabulary: the unknown (end) token
    assert not token_report(tokenizer)["digit_names_distinct_tokens"]


def test_every_block_cross_attends_with_wide_heads():
    config = text_unet_config()
    assert all("CrossAttn" in b for b in (*config["down_block_types"], *config["up_block_types"]))
    assert config["mid_block_type"] == "UNetMidBlock2DCrossAttn" and config["only_cross_attention"]
    unet = UNet2DConditionModel(**config)
    heads = [m.heads for n, m in unet.named_modules() if n.endswith("attn2")]
    widths = [m.inner_dim // m.heads for n, m in unet.named_modules() if n.endswith("attn2")]
    assert len(heads) >= 5 and set(widths) == {16}


def test_conditioning_probe_sees_a_unet_that_ignores_its_prompt(tmp_path):
    torch.manual_seed(0)
    tokenizer, text_encoder = build_text_model(tmp_path)
    net = TextEpsNet(UNet2DConditionModel(**TINY), Schedule()).eval()
    live = conditioning_report(tokenizer, text_encoder, net)
    assert live["eps_relative_change"]["500"]["cond_minus_uncond"] > 0
    assert live["text_states_between_digits"] > 0
    with torch.no_grad():
        for name, module in net.unet.named_modules():
            if name.endswith(("attn1", "attn2")):
                module.to_out[0].weight.zero_()
                module.to_out[0].bias.zero_()
    dead = conditioning_report(tokenizer, text_encoder, net)
    for t in ("100", "500", "900"):
        assert dead["eps_relative_change"][t]["cond_minus_uncond"] < 1e-6
        assert dead["eps_relative_change"][t]["spread_across_digits"] < 1e-6


def test_a_few_steps_train_the_text_encoder_and_record_caption_following_per_prompt(tmp_path):
    classifier = Classifier().eval()
    tokenizer, text_encoder, net, record = train_text_teacher(
        tiny_data(), tmp_path / "work", steps=3, batch=8, unet_config=TINY, classifier=classifier,
        eval_samples=2, eval_ddim_steps=2, probe_every=1,
    )  # fmt: skip
    assert [p["step"] for p in record["conditioning_probes"]] == [1, 2, 3]
    assert all(p["text_encoder_grad_norm"] > 0 for p in record["conditioning_probes"])
    torch.manual_seed(0)  # the EMA encoder moved from its initialisation (the same seed's fresh encoder)
    fresh = build_text_model(tmp_path / "fresh")[1]
    pairs = zip(text_encoder.state_dict().values(), fresh.state_dict().values(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)
    assert record["tokens"]["unknown_words"] == [] and record["unet_config"]["only_cross_attention"]
    following = record["caption_following"]
    for key in ("ddim2_cfg3", "one_step_t440"):
        train, heldout = following[key]["train_templates"], following[key]["heldout_templates"]
        assert len(train["per_prompt"]) == 10 * len(TRAIN_TEMPLATES)
        assert len(heldout["per_prompt"]) == 10 * len(HELDOUT_TEMPLATES)
        assert "a photo of the digit three" in train["per_prompt"]
        assert "a picture of the number three" in heldout["per_prompt"]
        assert all(v in (0.0, 0.5, 1.0) for v in train["per_prompt"].values())
        assert set(train["per_digit"]) == set(NAMES) and 0 <= train["mean"] <= 1

    folder = tmp_path / "pipe"
    save_text_pipeline(folder, tokenizer, text_encoder, net)
    assert inspect_pipeline(folder).latent_shape == (1, 8, 8)
    pipe = load_pipeline(folder)
    texts = ["a photo of the digit three", "a drawing of a seven", ""]
    assert torch.allclose(pipe.prompts(texts), PromptEncoder(tokenizer, text_encoder)(texts), atol=1e-6)
    again = caption_following(pipe.teacher, pipe.prompts, classifier, (1, 8, 8), 10, 2, 3.0, 2, 1)
    assert again["train_templates"] == following["ddim2_cfg3"]["train_templates"]


def test_the_packaged_text_teacher_loads_and_follows_its_captions():
    folder = checkpoints.PACKAGED / "digits_text_teacher"
    info = inspect_pipeline(folder)
    assert info.latent_shape == (1, 8, 8) and not info.has_vae
    pipe = load_pipeline(folder)
    assert token_report(pipe.prompts.tokenizer)["unknown_words"] == []
    clf = checkpoints.load(checkpoints.default_path("digits", "classifier"), "classifier", "digits", 8, 10)
    digits = [3, 8, 1]
    templates = (TRAIN_TEMPLATES[0], HELDOUT_TEMPLATES[0])
    texts = [prompt(t, d) for d in digits for t in templates for _ in range(4)]
    images = guided_ddim(pipe.teacher, pipe.prompts, texts, (1, 8, 8), 3.0, 10, 0)
    with torch.no_grad():
        preds = clf(images).argmax(1)
    labels = torch.tensor([d for d in digits for _ in range(8)])
    assert (preds == labels).float().mean() >= 0.9
