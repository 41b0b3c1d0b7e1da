"""Fixtures for the recipe tests: one torch thread (tiny networks; the machine is shared), restored after;
tiny random diffusers models saved as local folders (nothing comes from a hub)."""

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_BLOCKS = dict(
    sample_size=8,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
    norm_num_groups=4,
    mid_block_type=None,
)


@pytest.fixture(scope="session")
def rgb_model(tmp_path_factory):
    """A model folder: a random 3x8x8 UNet2DModel with 4 classes (time + class embeddings summed)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**TINY_BLOCKS, in_channels=3, out_channels=3, add_attention=False, num_class_embeds=4)
    folder = tmp_path_factory.mktemp("models") / "rgb-unet"
    unet.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def concat_pipeline(tmp_path_factory):
    """A pipeline folder (model_index.json, unet/, scheduler/): a random 1x8x8 UNet2DConditionModel with
    class_embeddings_concat=True, 3 classes and a null class, on a non-default v-prediction schedule."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        **TINY_BLOCKS,
        in_channels=1,
        out_channels=1,
        num_class_embeds=4,
        class_embeddings_concat=True,
        cross_attention_dim=8,
    )
    scheduler = DDPMScheduler(beta_end=0.012, prediction_type="v_prediction")
    folder = tmp_path_factory.mktemp("models") / "concat-pipeline"
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder
