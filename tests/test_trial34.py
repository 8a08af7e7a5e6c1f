"""Regression tests of trial34: deadrelu in real CI set-ups (GitLab's Docker executor, containers reading
a checkout another uid owns, non-UTF-8 logs)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
from conftest import ROOT

MLP_ONNX = ROOT / "sample_models" / "mlp" / "model.onnx"  # 6 of its 40 units are dead (README)
MLP_CALIB = MLP_ONNX.parent / "calib.npz"
FAILS_EVERY_DEAD_UNIT = "[tool.deadrelu]\nmax-dead = 0.0\n"


def _checkout(tmp_path, mode: int, file_mode: int = 0o644):
    """A checkout whose pyproject.toml sets max-dead = 0 (the sample MLP then fails the gate: exit 1,
    exit 0 without the settings), its folder and the file with the given modes."""
    checkout = tmp_path / "checkout"
    (checkout / "sub").mkdir(parents=True)
    settings = checkout / "pyproject.toml"
    settings.write_text(FAILS_EVERY_DEAD_UNIT)
    settings.chmod(file_mode)
    (checkout / "sub").chmod(mode)
    checkout.chmod(mode)
    return checkout


def test_gitlab_docker_executor_checkout_with_umask_0000_uses_its_settings(cli, tmp_path, monkeypatch):
    """GitLab's Docker executor clones with umask 0000: every folder 0777, every file 0666. The
    project's own pyproject.toml was refused ("writable by other users", exit 2) in the job the docs show.
    A folder anyone may change holds models and --arch code no safer than the settings, so they apply."""
    checkout = _checkout(tmp_path, 0o777, 0o666)
    for here in (checkout, checkout / "sub"):
        monkeypatch.chdir(here)
        result = cli("scan", MLP_ONNX, "--data", MLP_CALIB)
        assert result.code == 1, result.err  # the file's max-dead = 0 applied
        assert "6/40" in result.out
    # a settings file in a shared folder (sticky like /tmp, or open above a checkout of one's own) stays refused
    (tmp_path / "mine").mkdir()
    for shared_mode, here in ((0o1777, checkout), (0o777, tmp_path / "mine")):
        (tmp_path / "deadrelu.toml").write_text("max-dead = 0.0\n")
        tmp_path.chmod(shared_mode)
        checkout.chmod(0o1777 if shared_mode == 0o1777 else 0o755)
        (checkout / "pyproject.toml").unlink(missing_ok=True)
        monkeypatch.chdir(here)
        result = cli("scan", MLP_ONNX, "--data", MLP_CALIB)
        assert result.code == 2 and "writable by other users" in result.err, (oct(shared_mode), result.err)
        assert result.err.count("\n") == 1
    tmp_path.chmod(0o755)


def test_container_user_reading_a_checkout_another_uid_owns_uses_its_settings(cli, tmp_path, monkeypatch):
    """A container's user (uid 1000) on a checkout the runner's uid 1001 cloned: the checkout's own
    pyproject.toml was refused ("another user owns it"). Its folder's owner could replace it anyway.
    Simulated by claiming another euid than the files' owner; a file whose owner is neither us, root nor
    its folder's owner (a plant in /tmp) is still refused, checked where chown is allowed (root)."""
    checkout = _checkout(tmp_path, 0o755)
    owner = checkout.stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1000)
    monkeypatch.chdir(checkout / "sub")
    result = cli("scan", MLP_ONNX, "--data", MLP_CALIB)
    assert result.code == 1, result.err
    if owner == 0:  # root: the file handed to another uid than its folder's
        os.chown(checkout / "pyproject.toml", 4242, 4242)
        result = cli("scan", MLP_ONNX, "--data", MLP_CALIB)
        assert result.code == 2 and "another user owns it" in result.err, result.err
        monkeypatch.setattr(os, "geteuid", lambda: 0)  # root is no exception: it would run the plant
        result = cli("scan", MLP_ONNX, "--data", MLP_CALIB)
        assert result.code == 2 and "another user owns it" in result.err, result.err
    else:
        print("not root: the foreign-owner half needs chown")
