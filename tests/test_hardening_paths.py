"""Every path a node writes (issue 21, class 4).

Save names are checked as a whole against the real target folder
(``adapters/weights/write_paths.py``); Windows' rules are checked on every OS (``ntpath`` on
Linux), and files are written to a fresh temporary file in the folder and renamed,
never through a planted link. Tried on the rules themselves, on the atomic writer
and on every node that writes: Save identity tokens (``filename_prefix``) and
Personalize identity (``save_name``).
"""

from __future__ import annotations

import ntpath
import os
import re

import pytest
import torch

from conftest import pack

write_paths = pack("adapters.weights.write_paths")
WritePathError = write_paths.WritePathError

WINDOWS_ONLY = [  # harmless-looking on Linux, dangerous on Windows
    "C:foo", "C:foo.safetensors", "c:/x.safetensors", "C:\\x.safetensors", "D:..\\x", "\\\\server\\share\\x.safetensors",
    "//server/share/x.safetensors", "\\\\?\\C:\\x", "\\\\.\\pipe\\x", "\\x.safetensors", "a\\..\\..\\x", "x:stream",
    "CON", "con.safetensors", "people/NUL.safetensors", "Aux", "COM1.txt", "lpt9", "CONIN$", "name.", "name ", "dir./x", "dir /x",
]
EVERYWHERE = [
    "", " ", "/etc/passwd", "/", "../x", "a/../../x", "..", "a/..", "a\x00b", "\x00", "a\nb", "tab\there", "bell\x07", "del\x7f",
    "x" * 256, "é" * 128 + "x", ("a" * 200 + "/") * 6 + "x", "./..", "//", "a:b",
]
ACCEPTED = ["anna", "people/anna", "people\\anna", "a.b-c_d e", "ünïcødé", "./anna", "a//b", "x" * 255, "CONSOLE", "comic", "a.b.c"]


@pytest.mark.parametrize("name", WINDOWS_ONLY + EVERYWHERE, ids=repr)
def test_names_that_leave_or_cannot_exist_are_refused(name):
    with pytest.raises(WritePathError) as info:
        write_paths.name_parts(name)
    assert "Fix:" in str(info.value)


@pytest.mark.parametrize("name", WINDOWS_ONLY, ids=repr)
def test_windows_rules_hold_on_linux(name):
    """Each Windows-only case is one that ntpath itself (Windows' path rules) sees as a drive, root, stream, device or trimmed name."""
    drive, rest = ntpath.splitdrive(name)
    stem = re.split(r"[\\/]", name)
    assert drive or ntpath.isabs(name) or ":" in name or ".." in re.split(r"[\\/]", name) or any(
        p.split(".")[0].upper() in write_paths.WINDOWS_DEVICES or p[-1:] in (".", " ") for p in stem
    )


@pytest.mark.parametrize("name", ACCEPTED, ids=repr)
def test_plain_names_are_accepted(name, tmp_path):
    parts = write_paths.name_parts(name)
    path = write_paths.resolve_write_path(str(tmp_path), name)
    assert path == os.path.join(str(tmp_path), *parts)


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "models" / "identity_attention"
    (root / "inside").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.safetensors"
    victim.write_bytes(b"precious")
    os.symlink(outside, root / "linked_out")
    os.symlink(root / "inside", root / "linked_in")
    os.symlink(victim, root / "file_link.safetensors")
    (root / "afile.safetensors").write_bytes(b"x")
    return root, outside, victim


@pytest.mark.parametrize("name,why", [
    ("linked_out/x.safetensors", "outside"),
    ("linked_out/sub/x.safetensors", "outside"),
    ("file_link.safetensors", "symbolic link"),
    ("afile.safetensors/x.safetensors", "is a file"),
    ("afile.safetensors/deeper/x", "is a file"),
    ("inside", "existing folder"),
])
def test_links_and_files_on_the_way_are_refused(tree, name, why):
    root, _, victim = tree
    with pytest.raises(WritePathError, match=why):
        write_paths.resolve_write_path(str(root), name)
    assert victim.read_bytes() == b"precious"


def test_links_inside_the_folder_and_a_linked_folder_work(tree, tmp_path):
    root, _, _ = tree
    assert write_paths.resolve_write_path(str(root), "linked_in/x.safetensors").endswith("x.safetensors")
    elsewhere = tmp_path / "disk2"
    elsewhere.mkdir()
    os.symlink(elsewhere, tmp_path / "models_link")  # the whole folder on another disk
    path = write_paths.resolve_write_path(str(tmp_path / "models_link"), "a/b.safetensors")
    write_paths.write_atomically(path, lambda f: f.write(b"ok"))
    assert (elsewhere / "a" / "b.safetensors").read_bytes() == b"ok"


def test_a_planted_part_link_is_never_written_through(tree):
    root, _, victim = tree
    target = root / "anna.safetensors"
    for planted in (str(target) + ".part", str(root / ".anna.safetensors.part")):
        os.symlink(victim, planted)
    write_paths.write_safetensors(str(target), {"w": torch.ones(2)})
    assert victim.read_bytes() == b"precious"
    assert target.is_file() and not target.is_symlink()
    leftovers = [p for p in os.listdir(root) if p.endswith(".part") and not os.path.islink(root / p)]
    assert leftovers == []


def test_a_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_paths.write_atomically(str(target), fail)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["x.safetensors"]


# --- the nodes that write ----------------------------------------------------------------------------


@pytest.fixture()
def node_root(tmp_path, monkeypatch, tree):
    import folder_paths

    root, outside, victim = tree
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "identity_attention", ([str(root)], {".safetensors"}))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "embeddings", ([str(tmp_path / "embeddings")], {".safetensors"}))
    return root, outside, victim


@pytest.mark.parametrize("prefix", WINDOWS_ONLY[:12] + EVERYWHERE[:14] + ["linked_out/anna", "afile.safetensors/anna", "linked_out/../linked_out/x"], ids=repr)
def test_save_identity_tokens_refuses_every_bad_prefix(node_root, prefix):
    root, _, victim = node_root
    nodes_mod = pack("nodes.stage_tokens.stage_token_nodes")
    errors = pack("nodes.common.errors")
    tokens = pack("adapters.attention.stage_tokens").make_tokens("sd15")
    with pytest.raises(errors.IdentityAttentionError) as info:
        nodes_mod.SaveIdentityTokens().save(tokens, prefix)
    assert info.value.input_name == "filename_prefix" and info.value.node == "Save identity tokens"
    assert victim.read_bytes() == b"precious"
    assert not list((root.parent.parent / "outside").glob("*_0000*"))


def test_save_identity_tokens_writes_inside(node_root):
    root, _, _ = node_root
    nodes_mod = pack("nodes.stage_tokens.stage_token_nodes")
    tokens = pack("adapters.attention.stage_tokens").make_tokens("sd15")
    assert nodes_mod.SaveIdentityTokens().save(tokens, "people/anna")["result"][0] == "people/anna_00001.safetensors"
    assert nodes_mod.SaveIdentityTokens().save(tokens, "linked_in/anna")["result"][0] == "linked_in/anna_00001.safetensors"
    assert (root / "inside" / "anna_00001.safetensors").is_file()


@pytest.mark.parametrize("name", ["CON", "nul", "a:b", "../x", "a/b", "C:x", "x" * 200, "a\x00"], ids=repr)
def test_personalize_save_names_are_checked_before_training(name):
    train_nodes = pack("nodes.training.train_nodes")
    errors = pack("nodes.common.errors")
    with pytest.raises(errors.IdentityAttentionError) as info:
        train_nodes.checked_save_name(name, "Personalize identity")
    assert info.value.input_name == "save_name"


def test_personalize_saves_never_follow_links(node_root, tmp_path):
    root, _, victim = node_root
    train_nodes = pack("nodes.training.train_nodes")
    os.symlink(victim, root / "anna.safetensors")
    with pytest.raises(WritePathError, match="symbolic link"):
        train_nodes.save_outputs("anna", None, {})
    assert victim.read_bytes() == b"precious"
