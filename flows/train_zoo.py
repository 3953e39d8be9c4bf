"""Train the offline model zoo (`tasks.zoo.train`): one task per member, parents before fine-tuned children.

Cached by the files themselves: a member whose checkpoint and model card exist in `out_dir` with
the current spec hash is skipped (`force=True` retrains everything). Members train one after the
other, each deterministic (`tasks.zoo.train.TRAIN_THREADS` CPU threads).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.zoo import Member, checkpoint_path, is_current, read_card, spec_hashes, train_member, zoo_members


@task(name="train-zoo-member", cache_policy=NO_CACHE)
def train_member_task(member: Member, out_dir: str, expected_hash: str, parent: str | None, force: bool) -> str:
    """Train one member unless it is current; returns its checkpoint path."""
    logger = get_run_logger()
    if not force and is_current(out_dir, member.name, expected_hash):
        logger.info("zoo member %s is current (spec %s): skipped", member.name, expected_hash)
        return str(checkpoint_path(out_dir, member.name))
    logger.info("training zoo member %s (%s, %s, %d epochs)", member.name, member.arch, member.objective,
                member.epochs)
    path = train_member(member, out_dir, expected_hash=expected_hash, parent=parent)
    probe = read_card(out_dir, member.name)["linear_probe"]
    logger.info("trained %s: held-out linear probe %.3f (random init %.3f)", member.name, probe["accuracy"],
                probe["random_init_accuracy"])
    return str(path)


@flow(name="ckaflow-train-zoo")
def train_zoo(out_dir: str, variant: str = "demo", force: bool = False) -> dict[str, str]:
    """Train (or reuse) every member of the zoo `variant` in `out_dir`; returns name -> checkpoint path."""
    members = zoo_members(variant)
    hashes = spec_hashes(members)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    for member in members:
        parent = paths[member.finetuned_from] if member.finetuned_from else None
        paths[member.name] = train_member_task.with_options(task_run_name=f"train-{member.name}")(
            member, out_dir, hashes[member.name], parent, force)
    return paths
