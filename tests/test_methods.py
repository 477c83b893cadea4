"""Every registered method through two tiny tasks of the procedural echo data, plus
the baselines' own pieces: exemplar budget and replay, ABD's cached generator, LwM's
attention maps."""

import copy
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from fl_ci.config import Config, ConfigError
from fl_ci.experiment import Experiment
from fl_ci.losses import feature_distillation
from fl_ci.methods import SiteStore, build_method, registry
from fl_ci.methods.base import Batch, model_hash
from fl_ci.methods.icarl import herding
from fl_ci.methods.lwm import attention_distillation, grad_cam
from fl_ci.metrics import accuracy_from_counts
from fl_ci.models import build_model
from fl_ci.plan import grow_for_task
from fl_ci.site import class_counts, site_class_means, site_round
from fl_ci.study import RoundResult, Study

MEMORY = 10  # exemplar budget: 3 per class after task 0, 2 per class after task 1
EXEMPLAR_METHODS = ("icarl", "lucir")


def tiny_config(method: str) -> Config:
    # No augmentation and lr 0.05: the tiny model fits its first task in 8 epochs.
    return Config.from_dict(
        {
            "dataset": "echo-synth",
            "tasks": 2,
            "init_classes": 3,
            "method": method,
            "local_epochs": 8,
            "lr": 0.05,
            "augment": False,
            "batch_size": 16,
            "device": "cpu",
            "data": {"patients": 10, "devices": 2, "image_size": 32, "frames": 2},
            "synthesis": {"iterations": 5, "per_class": 4},
            "baselines": {
                "memory": MEMORY,
                "abd_iterations": 5,
                "abd_batch_size": 16,
                "abd_z_dim": 32,
                "abd_width": 16,
            },
        }
    )


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def experiment(one_thread) -> Experiment:
    return Experiment.from_config(tiny_config("finetune"))


def run_two_tasks(exp: Experiment, store: SiteStore, out) -> dict:
    """Both tasks through the one study loop (fl_ci.study) at one site, one round
    each, with first-task accuracy measured on the training rows."""
    site = exp.site(0)
    study = Study(exp.cfg, out, central=exp, progress=False)
    tasks, step = [], None
    for step in study.rounds():
        model, metrics = site_round(
            site,
            step.model,
            step.teacher,
            task=step.task,
            round=step.round,
            class_means=step.means,
            store=store,
            progress=False,
        )
        study.finish_round(
            step, RoundResult(model.state_dict(), site_class_means(site, step.task))
        )
        memory = store.get(f"{exp.cfg.method}-exemplars")
        train = exp.splits.train.of_classes(list(range(exp.seen(step.task))))
        counts = class_counts(study.model, train, exp.cfg)
        per_task = accuracy_from_counts(
            counts.correct, counts.total, exp.tasks, step.task
        )["per_task"]  # % per task
        tasks.append(
            {
                "metrics": metrics,
                "first_task_accuracy": per_task[0],
                "exemplar_labels": None if memory is None else memory["labels"],
            }
        )
    return {
        "tasks": tasks,
        "model": study.model,
        "teacher": study.teacher,
        "means": step.means,
    }


@pytest.fixture(scope="module")
def runs(experiment, tmp_path_factory):
    """Run each method once, on first use, with a store on disk; cached per module."""
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            plan = dataclasses.replace(
                experiment.plan, cfg=experiment.cfg.replace(method=name)
            )
            exp = dataclasses.replace(experiment, plan=plan)
            store = SiteStore(tmp_path_factory.mktemp(name))
            out = tmp_path_factory.mktemp(f"{name}-run")
            cache[name] = {"exp": exp, "store": store, **run_two_tasks(exp, store, out)}
        return cache[name]

    return get


def test_base_epochs_train_only_the_first_task_longer(experiment, tmp_path):
    cfg = experiment.cfg.replace(local_epochs=1, base_epochs=3)
    exp = dataclasses.replace(
        experiment, plan=dataclasses.replace(experiment.plan, cfg=cfg)
    )
    first, second = (
        t["metrics"]
        for t in run_two_tasks(exp, SiteStore(tmp_path / "store"), tmp_path)["tasks"]
    )
    # fine-tuning sees each real row once an epoch: 3 epochs, then 1
    assert first["train_images"] == 3 * first["num_examples"]
    assert second["train_images"] == second["num_examples"]


@pytest.mark.parametrize("name", sorted(registry()))
def test_method_learns_first_task_above_chance(runs, name):
    accuracy = runs(name)["tasks"][0]["first_task_accuracy"]  # % on 3 classes
    assert accuracy > 50.0, f"{name}: {accuracy:.1f}% on the first task (chance 33%)"


@pytest.mark.parametrize("name", sorted(registry()))
def test_method_losses_are_finite(runs, name):
    for task in runs(name)["tasks"]:
        metrics = task["metrics"]
        assert metrics["train_steps"] > 0
        losses = {k: v for k, v in metrics.items() if k.startswith("train_")}
        assert all(math.isfinite(v) for v in losses.values()), losses


@pytest.mark.parametrize("name", EXEMPLAR_METHODS)
def test_exemplars_never_exceed_the_budget(runs, name):
    for task, seen in zip(runs(name)["tasks"], (3, 5), strict=True):
        labels = task["exemplar_labels"]
        assert 0 < len(labels) <= MEMORY
        assert labels.bincount().max() <= MEMORY // seen


@pytest.mark.parametrize("name", EXEMPLAR_METHODS)
def test_exemplars_are_replayed_from_the_store(runs, name):
    # a fresh method object per round: replayed rows can only come from the store
    metrics = runs(name)["tasks"][1]["metrics"]
    epochs = runs(name)["exp"].cfg.local_epochs
    assert metrics["train_images"] > epochs * metrics["num_examples"]


def test_herding_picks_distinct_rows_nearest_the_mean_first():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(20, 8, generator=g)
    order = herding(feats, 5)
    unit = torch.nn.functional.normalize(feats, dim=1)
    nearest = (unit - unit.mean(0)).norm(dim=1).argmin()
    assert len(set(order.tolist())) == 5 and order[0] == nearest


def test_abd_reuses_its_cached_generator_after_a_restart(runs):
    run = runs("abd")
    (path,) = run["store"].root.glob("abd-generator-task1-*.pt")
    stamp = path.stat().st_mtime_ns
    site_round(
        run["exp"].site(0),
        copy.deepcopy(run["model"]),
        run["teacher"],
        task=1,
        round=1,
        store=SiteStore(run["store"].root),  # a restarted site: same folder only
        progress=False,
    )
    assert path.stat().st_mtime_ns == stamp


def test_grad_cam_has_the_feature_map_shape_and_is_differentiable():
    torch.manual_seed(0)
    model = build_model("echo_net", num_classes=3, in_channels=1)
    out = model.forward_all(torch.randn(4, 1, 32, 32))
    cam = grad_cam(out.fmap, out.logits, torch.tensor([0, 1, 2, 0]), create_graph=True)
    assert cam.shape == (4, *out.fmap.shape[2:])
    attention_distillation(cam, torch.rand_like(cam)).backward()
    # the head reaches the map only through the Grad-CAM weights (create_graph)
    assert model.head.new_weight.grad is not None
    assert model.head.new_weight.grad.abs().sum() > 0


def test_lwm_trains_with_the_attention_term(runs):
    assert runs("lwm")["tasks"][1]["metrics"]["train_attention"] > 0


def test_only_joint_icarl_lucir_keep_real_old_data():
    keep = {name for name, method in registry().items() if not method.data_free}
    assert keep == {"joint", "icarl", "lucir"}


def test_lucir_refuses_a_linear_head():
    with pytest.raises(ConfigError, match="head"):
        build_method(tiny_config("lucir").replace(head="linear"))


def test_class_without_a_shared_mean_starts_from_noise_and_is_named(caplog):
    # class 1 was held by no site above the sharing floor: its mean has count 0
    exp = Experiment.from_config(tiny_config("class_impression"))
    teacher = exp.build_model().eval()
    means = site_class_means(exp.site(0), 0)
    means = dataclasses.replace(
        means,
        sums=means.sums * (torch.arange(3) != 1).view(-1, 1, 1, 1),
        counts=means.counts * (torch.arange(3) != 1),
    )
    model = grow_for_task(teacher, len(exp.tasks[1]))
    store = SiteStore()
    with caplog.at_level("WARNING", logger="fl_ci"):
        site_round(
            exp.site(0),
            model,
            teacher,
            task=1,
            round=0,
            class_means=means,
            store=store,
            progress=False,
        )
    assert "no site shared a mean of classes [1]" in caplog.text
    impressions = store.get(f"impressions-task1-{model_hash(teacher)}")
    assert impressions["labels"].bincount().tolist() == [4, 4, 4]  # still balanced


# ----- Class Impression's levers against forgetting ----------------------------------
def lever_gradients(**ci) -> dict[str, torch.Tensor]:
    """Gradients of Class Impression's loss on one batch of 2 real new-class rows and
    2 impression rows, at task 1 of a 2-old + 1-new model, with `ci` switches; also
    the loss terms ("terms") and both models' outputs ("out", "teacher_out")."""
    cfg = tiny_config("class_impression")
    cfg = cfg.replace(ci=dataclasses.replace(cfg.ci, contrastive_weight=0.0, **ci))
    method = build_method(cfg)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        teacher = build_model("echo_net", 2, in_channels=1, head="cosine")
        student = grow_for_task(teacher, 1, seed=1)
        x = torch.randn(4, 1, 32, 32)
    teacher.eval()
    student.train()
    student.freeze_old_classes(True)
    ctx = SimpleNamespace(num_old=2, new_classes=[2], task=1)
    batch = Batch(
        x, torch.tensor([2, 2, 0, 1]), torch.tensor([False, False, True, True])
    )
    out = student.forward_all(x)
    with torch.no_grad():
        teacher_out = teacher.forward_all(x)
    loss, terms = method.loss(student, batch, out, teacher_out, ctx)
    loss.backward()
    grads = {
        n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None
    }
    return grads | {"terms": terms, "out": out, "teacher_out": teacher_out}


def test_head_alignment_trains_the_head_alone():
    without = lever_gradients()
    aligned = lever_gradients(head_align_weight=1.0)
    for name, grad in without.items():
        if name.startswith("backbone."):  # (the non-gradient entries are skipped)
            assert torch.equal(aligned[name], grad), name
    assert not torch.equal(aligned["head.new_weight"], without["head.new_weight"])


def test_local_cross_entropy_of_one_new_class_leaves_only_the_other_terms():
    # one new class: its rows' local CE is 0, so with every other term off the
    # impression rows' old-class CE is the whole loss and the new row gets no gradient
    grads = lever_gradients(real_ce="local", distill_weight=0.0, margin_weight=0.0)
    assert torch.count_nonzero(grads.get("head.new_weight", torch.zeros(1))) == 0


def test_distilling_synthetic_rows_leaves_the_real_rows_features_free():
    got = lever_gradients(distill_rows="synthetic")
    extra = torch.tensor([False, False, True, True])
    expected = feature_distillation(
        got["out"].features[extra], got["teacher_out"].features[extra]
    )
    assert torch.allclose(got["terms"]["distill"], expected.detach())
    everything = lever_gradients()["terms"]["distill"]
    assert not torch.allclose(everything, expected.detach())


def test_feature_replay_keeps_real_statistics_and_trains_the_head_on_them(
    experiment, tmp_path
):
    """`ci.prototype_weight`: the site keeps each task's feature statistics (never
    images) and, at the next task, adds the head's cross-entropy on pseudo-features
    drawn from them."""
    cfg = tiny_config("class_impression")
    cfg = cfg.replace(ci=dataclasses.replace(cfg.ci, prototype_weight=1.0))
    plan = dataclasses.replace(experiment.plan, cfg=cfg)
    exp = dataclasses.replace(experiment, plan=plan)
    store = SiteStore(tmp_path / "site")
    got = run_two_tasks(exp, store, tmp_path / "run")
    kept = store.get("feature-stats")
    assert set(kept) == {"sums", "squares", "counts"}  # statistics, no images
    train = exp.site(0).train(1)  # the site's rows at both tasks, by class
    first = exp.site(0).train(0)
    expected = torch.bincount(first.labels, minlength=5) + torch.bincount(
        train.labels, minlength=4
    )
    assert kept["counts"].tolist() == expected.tolist()
    assert "train_prototype" not in got["tasks"][0]["metrics"]  # nothing old yet
    assert got["tasks"][1]["metrics"]["train_prototype"] > 0
