"""Table 2's other rows: MoCo v3 and DiffMAE objectives, timm backbones, released checkpoints (MAE, MoCo v3, USFM).

Each objective's test checks the piece of the original that defines it (MoCo v3: the momentum schedule's endpoints,
the symmetric loss, the frozen patch projection; DiffMAE: the noise schedule, noise on the masked patches only) and
that its loss falls in a short run on phantoms. Each import builds a checkpoint in the release's key names and shapes
(random values) and loads it with every key used.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from d2mae import experiment as ex
from d2mae.commands import main as cli
from d2mae.data.phantom import generate_phantoms
from d2mae.io.artifacts import load_classifier, load_pretrained
from d2mae.io.imports import backbone_state, import_pretrained
from d2mae.method.backbones import BackboneConfig, backbone_classifier
from d2mae.method.diffmae import DiffMAE, alphas_cumprod, seeded_normal
from d2mae.method.moco import MoCoV3, momentum_at
from d2mae.method.model_config import ModelConfig
from d2mae.runtime.errors import D2maeError
from d2mae.train.optim import build_optimizer
from d2mae.train.pretrain import pretrain
from d2mae.train.pretrain_config import make_config
from tests.conftest import TINY

MOCO = dict(TINY, objective="moco-v3", blur=False, blur_embed="none", moco_dim=16, moco_mlp_dim=32)
DIFF = dict(TINY, objective="diffmae", blur=False, blur_embed="none", loss_on="masked", diffusion_steps=100)


def images(b: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 1, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ph")
    generate_phantoms(out, n=32, size=48, seed=0)
    return out


def losses(folder: Path) -> list[float]:
    import json

    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------------------- MoCo v3


def test_moco_momentum_goes_from_its_base_to_one_on_a_half_cosine():
    assert momentum_at(0.0, 0.99) == pytest.approx(0.99)
    assert momentum_at(1.0, 0.99) == pytest.approx(1.0)
    assert momentum_at(0.5, 0.99) == pytest.approx(0.995)
    assert momentum_at(0.25, 0.99) == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi / 4)) * 0.01)  # cosine, not linear
    model = MoCoV3(ModelConfig(**MOCO))
    assert model.progress_inputs(0.0) == {"momentum": pytest.approx(0.99)}
    assert model.progress_inputs(1.0) == {"momentum": pytest.approx(1.0)}


def test_moco_loss_is_symmetric_in_the_two_views():
    model = MoCoV3(ModelConfig(**MOCO)).train()
    x1, x2 = images(8, seed=1), images(8, seed=2)
    a = model.loss(x1, x2, momentum=1.0)  # m = 1: the key encoder does not move between the two calls
    b = model.loss(x2, x1, momentum=1.0)
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(model.contrastive_loss(model.predictor(model.projector(model._features(model.encoder,
                                                                                                     x1))),
                                                     model.momentum_projector(model._features(model.momentum_encoder,
                                                                                              x2))),
                              a / 2, atol=1e-4)  # ctr(q1, k2) alone is not the symmetrised loss


def test_moco_keys_come_from_the_momentum_encoder_updated_by_ema():
    model = MoCoV3(ModelConfig(**MOCO))
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.momentum_encoder.parameters()]
    online = [p.clone() for p in model.encoder.parameters()]
    model.update_momentum(0.9)
    for b, o, now in zip(before, online, model.momentum_encoder.parameters()):
        assert torch.allclose(now, 0.9 * b + 0.1 * o)


def test_moco_patch_projection_stays_frozen_and_out_of_the_optimizer():
    cfg = make_config(preset="moco-v3", data=["x"], out="y", **{k: v for k, v in MOCO.items()
                                                                  if k not in ("objective", "blur", "blur_embed")})
    model = MoCoV3(cfg.model_config())
    opt = build_optimizer(model, cfg, 1e-3)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.encoder.patch_embed.proj.weight) not in in_opt
    assert not any(id(p) in in_opt for p in model.momentum_encoder.parameters())
    w = model.encoder.patch_embed.proj.weight.clone()
    x = images(8).unsqueeze(1).expand(8, 2, 1, 32, 32)
    loss, _, _ = model(x, momentum=0.99, **model.draw(torch.Generator().manual_seed(0), 8))
    loss.backward()
    opt.step()
    assert torch.equal(model.encoder.patch_embed.proj.weight, w)
    assert cfg.weight_decay == 0.1  # MoCo v3's ViT recipe


def test_moco_views_get_their_own_photometric_augmentation():
    model = MoCoV3(ModelConfig(**MOCO))
    x = images(16).unsqueeze(1).expand(16, 2, 1, 32, 32)
    params = model.draw(torch.Generator().manual_seed(0), 16)
    out = model.augment(x, params)
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert not torch.allclose(out[:, 0], out[:, 1])  # the same crop, two augmentations
    assert bool((params["blur_sigma"][:, 0] > 0).all())  # view 1 is always blurred (p = 1.0)
    assert not bool(params["solarize"][:, 0].any())  # and never solarised


@pytest.mark.parametrize("preset, extra", [("moco-v3", {"moco_dim": 16, "moco_mlp_dim": 64}),
                                           ("diffmae", {"diffusion_steps": 100})])
def test_objective_loss_falls_in_a_short_run(tmp_path, phantoms, preset, extra):
    arch = {k: v for k, v in TINY.items()}
    out = pretrain(make_config(preset=preset, data=[str(phantoms / "images")], out=str(tmp_path / preset),
                               epochs=30, batch_size=16, warmup_epochs=2, lr=2e-3, log_every_steps=1,
                               tensorboard="off", num_workers=0, data_path="memory", **arch, **extra))
    curve = losses(out)  # 60 steps, every view and mask fresh: noisy, so means of stretches are compared
    first, last = sum(curve[:20]) / 20, sum(curve[-10:]) / 10
    assert last < 0.95 * first, (first, last)
    model = load_pretrained(out)
    assert model.config.objective == preset and any(k.startswith("encoder.") for k in model.state_dict())


# --------------------------------------------------------------------------------------------------------- DiffMAE


def test_diffmae_noise_schedules():
    cos = alphas_cumprod(1000, "cosine")
    assert cos[0] == 1 and bool((cos[1:] < cos[:-1]).all()) and cos[-1] < 1e-4
    s, t = 0.008, 500
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    assert float(cos[t]) == pytest.approx(f(t / 1000) / f(0), rel=1e-4)
    lin = alphas_cumprod(1000, "linear")
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.allclose(lin[1:], torch.cumprod(1 - betas, 0))


def test_diffmae_noise_reaches_the_masked_patches_only():
    model = DiffMAE(ModelConfig(**DIFF)).eval()
    x = images(4)
    drawn = model.draw(torch.Generator().manual_seed(0), 4)
    seen: dict[str, torch.Tensor] = {}
    model.encoder.register_forward_hook(lambda m, args, out: seen.update(enc_in=args[0], latent=out[0]))
    model.noisy_embed.register_forward_hook(lambda m, args, out: seen.update(xt=args[0]))
    with torch.no_grad():
        model(x, **drawn)
    assert torch.equal(seen["enc_in"], x)  # the encoder sees the clean image (its visible patches)
    n, keep = model.config.num_patches, int(model.config.num_patches * 0.25)
    masked = torch.argsort(drawn["noise"], dim=1)[:, keep:]
    assert seen["xt"].shape == (4, n - keep, model.config.patch_size ** 2)  # one noisy token per masked patch, no more
    target = model.patchify(model.encoder.normalize(x))
    x0 = torch.gather(target, 1, masked.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
    eps = seeded_normal(drawn["eps_seed"], tuple(x0.shape[1:]), torch.device("cpu"))
    a = model.alphas_cumprod[drawn["step"]].view(-1, 1, 1)
    assert torch.allclose(seen["xt"], a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-5)
    latent_a = seen["latent"]
    with torch.no_grad():  # other noise: the same visible encoding
        model(x, drawn["noise"], drawn["step"], drawn["eps_seed"] + 1)
    assert torch.equal(seen["latent"], latent_a)


def test_diffmae_noise_of_a_sample_depends_on_its_seed_only():
    seeds = torch.tensor([3, 4, 5])
    a = seeded_normal(seeds, (2, 3), torch.device("cpu"))
    b = seeded_normal(seeds[1:], (2, 3), torch.device("cpu"))
    assert torch.equal(a[1:], b)


def test_objectives_refuse_the_blur_schedule():
    with pytest.raises(D2maeError, match="without the blur schedule"):
        ModelConfig(**dict(MOCO, blur=True))
    with pytest.raises(D2maeError, match="loss_on masked"):
        ModelConfig(**dict(DIFF, loss_on="all"))


# ------------------------------------------------------------------------------------------------------ checkpoints


def vit_tiny_state() -> dict[str, torch.Tensor]:
    """timm's vit_tiny_patch16_224 state dict: MAE's and MoCo v3's ViT names (random values)."""
    return timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict()


def test_official_mae_checkpoint_loads_with_every_encoder_key(tmp_path):
    vit = vit_tiny_state()
    torch.save({"model": vit}, tmp_path / "mae_pretrain_vit_tiny.pth")
    folder = import_pretrained(tmp_path / "mae_pretrain_vit_tiny.pth", tmp_path / "imp", img_size=32, in_chans=1,
                               mean=[0.3], std=[0.2])
    model = load_pretrained(folder)
    report = __import__("json").loads((folder / "config.json").read_text())["extra"]["imported"]["report"]
    used = set(vit) - set(report["unexpected"])
    assert used == set(vit)  # every tensor of the release was used
    assert torch.allclose(model.encoder.patch_embed.proj.weight, vit["patch_embed.proj.weight"].sum(1, keepdim=True))
    assert model.config.arch == "vit_tiny_patch16" and model.config.objective == "mae"


def test_official_moco_v3_checkpoint_loads_its_query_vit(tmp_path):
    vit = vit_tiny_state()
    state = {f"module.base_encoder.{k}": v for k, v in vit.items()}
    state.update({"module.base_encoder.head.0.weight": torch.zeros(64, 192),  # its projector
                  "module.base_encoder.head.1.weight": torch.ones(64),
                  "module.momentum_encoder.cls_token": torch.zeros(1, 1, 192),
                  "module.predictor.0.weight": torch.zeros(64, 256)})
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": state}, tmp_path / "vit-t-300ep.pth.tar")
    folder = import_pretrained(tmp_path / "vit-t-300ep.pth.tar", tmp_path / "imp", img_size=32, in_chans=1,
                               mean=[0.3], std=[0.2])
    model = load_pretrained(folder)
    report = __import__("json").loads((folder / "config.json").read_text())["extra"]["imported"]["report"]
    assert not report["unexpected"]  # every query-ViT tensor used, nothing else (its decoder is new)
    assert not [k for k in report["missing"] if k.startswith("encoder.")]
    assert torch.equal(model.encoder.blocks[3].attn.qkv.weight, vit["blocks.3.attn.qkv.weight"])
    # as a timm backbone too (the same release)
    c = BackboneConfig("timm:vit_tiny_patch16_224", 32, 1, [0.3], [0.2])
    loaded, notes = backbone_state(tmp_path / "vit-t-300ep.pth.tar", c)
    assert "MoCo v3" in notes[0] and set(loaded) == set(vit)


def usfm_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint in USFM's released layout: BEiT-B names, one shared relative position bias, a pre-training norm,
    mask token and LM head (random values, 3 channels, 224 px)."""
    beit = timm.create_model("beit_base_patch16_224", num_classes=0).state_dict()
    state = {k: v for k, v in beit.items() if not k.endswith("relative_position_bias_table")
             and not k.startswith(("fc_norm.", "head."))}
    state["rel_pos_bias.relative_position_bias_table"] = torch.randn(732, 12)
    state.update({"norm.weight": torch.ones(768), "norm.bias": torch.zeros(768), "mask_token": torch.zeros(1, 1, 768),
                  "lm_head.weight": torch.zeros(8192, 768)})
    torch.save(state, path)
    return state


def test_usfm_checkpoint_loads_into_timm_beit_with_every_key_used(tmp_path):
    state = usfm_checkpoint(tmp_path / "USFM_latest.pth")
    c = BackboneConfig("timm:beit_base_patch16_224", 224, 1, [0.3], [0.2])
    loaded, notes = backbone_state(tmp_path / "USFM_latest.pth", c)
    assert any("shared relative position bias copied into 12 blocks" in n for n in notes)
    model = backbone_classifier(c, 2, 0.0, loaded, tmp_path / "USFM_latest.pth").model
    own = model.state_dict()
    for k, v in state.items():
        if k in own and k != "patch_embed.proj.weight":
            assert torch.equal(own[k], v), k
    assert torch.equal(own["blocks.7.attn.relative_position_bias_table"],
                       state["rel_pos_bias.relative_position_bias_table"])
    assert torch.allclose(own["patch_embed.proj.weight"], state["patch_embed.proj.weight"].sum(1, keepdim=True))
    unused = set(state) - set(own) - {"rel_pos_bias.relative_position_bias_table"}
    assert unused == {"norm.weight", "norm.bias", "mask_token", "lm_head.weight"}  # pre-training heads only


def test_timm_weights_adapt_channels_and_size_and_reset_the_classifier(tmp_path):
    ref = timm.create_model("vit_tiny_patch16_224")  # ImageNet-shaped: 3 channels, 224 px, 1000 classes
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "model.safetensors")
    c = BackboneConfig("timm:vit_tiny_patch16_224", 32, 1, [0.3], [0.2])
    state, _ = backbone_state(tmp_path / "model.safetensors", c)
    clf = backbone_classifier(c, 2, 0.0, state, tmp_path / "model.safetensors")
    assert clf.model.head.weight.shape == (2, 192)
    assert torch.allclose(clf.model.patch_embed.proj.weight, ref.patch_embed.proj.weight.sum(1, keepdim=True))
    assert torch.equal(clf.model.blocks[5].mlp.fc1.weight, ref.blocks[5].mlp.fc1.weight)
    assert clf(images(2)).shape == (2, 2)


def test_weights_of_another_architecture_or_layout_are_refused(tmp_path):
    save_file({k: v.contiguous() for k, v in timm.create_model("vit_tiny_patch16_224").state_dict().items()},
              tmp_path / "vit.safetensors")
    with pytest.raises(D2maeError, match="does not match timm:convnext_atto"):
        backbone_state(tmp_path / "vit.safetensors", BackboneConfig("timm:convnext_atto", 32, 1, [0.3], [0.2]))
    usfm_checkpoint(tmp_path / "usfm.pth")
    with pytest.raises(D2maeError, match="BEiT layout"):
        import_pretrained(tmp_path / "usfm.pth", tmp_path / "x", img_size=32, in_chans=1, mean=[0.3], std=[0.2])
    with pytest.raises(D2maeError, match="did you mean"):
        BackboneConfig("timm:vit_tiny_patch16", 32, 1, [0.3], [0.2])


# -------------------------------------------------------------------------------------- the command line and runner


def finetune_args(phantoms: Path, out: Path) -> list[str]:
    return ["finetune", "--labels", str(phantoms / "labels.csv"), "--out", str(out), "--protocol", "split:3:1:1",
            "--epochs", "1", "--batch-size", "8", "--workers", "0", "--img-size", "32", "--tensorboard", "off",
            "--no-progress"]


@pytest.mark.parametrize("extra, words", [
    (["--backbone", "timm:resnet_tiny"], "--backbone: timm has no model"),
    (["--backbone", "timm:convnext_atto", "--backbone-weights", "WRONG"], "--backbone-weights"),
    (["--backbone", "timm:convnext_atto", "--mode", "linear"], "--mode: the linear probe"),
    (["--pretrained", "USFM"], "BEiT layout"),
])
def test_bad_table2_inputs_are_one_line_and_exit_2_before_training(tmp_path, phantoms, capsys, extra, words):
    save_file({k: v.contiguous() for k, v in timm.create_model("vit_tiny_patch16_224").state_dict().items()},
              tmp_path / "vit.safetensors")
    usfm_checkpoint(tmp_path / "usfm.pth")
    extra = [{"WRONG": str(tmp_path / "vit.safetensors"), "USFM": str(tmp_path / "usfm.pth")}.get(a, a) for a in extra]
    assert cli.main(finetune_args(phantoms, tmp_path / "out") + extra) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list((tmp_path / "out").glob("fold_*"))


def test_timm_backbone_fine_tunes_and_predicts(tmp_path, phantoms, capsys):
    ref = timm.create_model("convnext_atto")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "cnx.safetensors")
    out = tmp_path / "ft"
    assert cli.main(finetune_args(phantoms, out) + ["--backbone", "timm:convnext_atto", "--backbone-weights",
                                                    str(tmp_path / "cnx.safetensors")]) == 0
    model, meta = load_classifier(out / "fold_1" / "model")
    assert meta["model"]["backbone"] == "timm:convnext_atto" and meta["obs"]["mode"] == "none"
    assert cli.main(["predict", "--model", str(out), str(phantoms / "images"), "--out", str(tmp_path / "p.csv")]) == 0
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 33


def test_experiment_needs_the_weights_of_imported_rows(tmp_path):
    from tests.test_experiment import MICRO

    data = dict(MICRO, methods=["usfm", "d2mae"])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(D2maeError, match="weights:"):
        ex.load_experiment(tmp_path / "c.yaml")
    data["weights"] = {"usfm": str(tmp_path / "missing.pth")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    plan = ex.make_plan(ex.load_experiment(tmp_path / "c.yaml"), tmp_path / "out")
    assert plan.missing_weights() == {"usfm": str(tmp_path / "missing.pth")}
    assert "MISSING WEIGHTS: usfm" in ex.format_plan(plan)
    with pytest.raises(D2maeError, match="does not exist"):
        ex.run_experiment(ex.load_experiment(tmp_path / "c.yaml"), tmp_path / "out", estimate=False)


def test_every_pre_trained_row_gets_the_same_budget(tmp_path):
    from tests.test_experiment import MICRO

    data = dict(MICRO, methods=["timm:convnext_atto", "moco-v3", "diffmae", "mae", "deblurrmae", "d2mae"])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    plan = ex.make_plan(ex.load_experiment(tmp_path / "c.yaml"), tmp_path / "out")
    pre = plan.of("pretrain")
    assert {s.preset for s in pre} == {"moco-v3", "diffmae", "mae", "deblurrmae", "d2mae"}
    assert len({(s.payload.epochs, s.payload.max_steps, s.payload.batch_size, s.payload.accum_iter) for s in pre}) == 1
    ft = {s.method: s.payload for s in plan.of("finetune")}
    assert ft["timm:convnext_atto"].backbone == "timm:convnext_atto" and ft["timm:convnext_atto"].mode == "scratch"
    assert ft["moco-v3"].spec.mode == "none" and ft["d2mae"].spec.mode == "search"
    # a preset may bring its own recipe (MoCo v3's weight decay), never a budget of its own
    from d2mae.method import presets as pt

    original = dict(pt.PRESETS["moco-v3"])
    pt.PRESETS["moco-v3"]["accum_iter"] = 2
    try:
        with pytest.raises(D2maeError, match="equal-budget rule broken"):
            ex.make_plan(ex.load_experiment(tmp_path / "c.yaml"), tmp_path / "out")
    finally:
        pt.PRESETS["moco-v3"] = original


@pytest.mark.slow
def test_table2_rows_run_end_to_end_in_the_experiment(tmp_path):
    from tests.test_experiment import MICRO

    data = dict(MICRO, methods=["timm:convnext_atto", "moco-v3", "diffmae", "d2mae"])
    data["model"] = dict(data["model"], moco_dim=16, moco_mlp_dim=32, diffusion_steps=50)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert cli.main(["experiment", str(tmp_path / "c.yaml"), "--out", str(out), "--no-estimate"]) == 0
    md = (out / "report.md").read_text(encoding="utf-8")
    for label in ("| convnext_atto (timm) |", "| MoCo v3 (US) |", "| DiffMAE (US) |", "| D²MAE |"):
        assert label in md, label
    assert (out / "figures" / "reconstruction_ph_d2mae.png").is_file()
    assert not (out / "figures" / "reconstruction_ph_moco-v3.png").exists()


def test_table2_configs_parse_and_list_every_row():
    from tests.conftest import REPO

    full = ex.load_experiment(REPO / "configs" / "table2-full.yaml")
    assert set(full.methods) >= {"mae-imagenet", "moco-v3-imagenet", "usfm", "moco-v3", "diffmae", "mae",
                                 "deblurrmae", "d2mae", *ex.TABLE2_TIMM}
    cpu = ex.load_experiment(REPO / "configs" / "table2-busbra.yaml")
    assert not cpu.weights and {"moco-v3", "diffmae", "mae", "deblurrmae", "d2mae"} <= set(cpu.methods)
