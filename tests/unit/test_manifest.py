"""Model manifests: a changed, missing or truncated file is caught; a good copy verifies fast."""

import json
import os

from mlx_jaccl_cluster.ops import manifest as m


def _model(tmp_path):
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model.safetensors").write_bytes(os.urandom(4096))
    (d / "sub" / "tokenizer.json").write_text("{}")
    return d


def test_build_lists_every_file_with_size_and_hash(tmp_path):
    d = _model(tmp_path)
    man = m.build(d)
    assert set(man["files"]) == {"config.json", "model.safetensors", "sub/tokenizer.json"}
    assert man["files"]["model.safetensors"]["size"] == 4096
    assert len(man["files"]["config.json"]["sha256"]) == 64


def test_a_good_copy_verifies_and_leaves_a_stamp(tmp_path):
    d = _model(tmp_path)
    man = m.build(d)
    assert m.problems(d, man) == []
    assert (d / m.STAMP).is_file()
    assert m.problems(d, man) == []  # the stamped path


def test_same_size_corruption_is_caught_even_after_a_stamp(tmp_path):
    d = _model(tmp_path)
    man = m.build(d)
    assert m.problems(d, man) == []
    data = bytearray((d / "model.safetensors").read_bytes())
    data[100] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(data))
    assert m.problems(d, man) == ["model.safetensors: sha256 differs"]


def test_missing_and_truncated_files_are_named(tmp_path):
    d = _model(tmp_path)
    man = m.build(d)
    (d / "config.json").unlink()
    (d / "model.safetensors").write_bytes(b"short")
    issues = m.problems(d, man)
    assert "config.json: missing" in issues
    assert "model.safetensors: 5 bytes, expected 4096" in issues


def test_cli_build_then_verify(tmp_path, capsys):
    d = _model(tmp_path)
    assert m.main(["build", str(d)]) == 0
    assert json.loads((d / m.MANIFEST).read_text())["files"]
    assert m.main(["verify", str(d)]) == 0
    (d / "sub" / "tokenizer.json").write_text("{changed}")
    assert m.main(["verify", str(d)]) == 1
    assert "sub/tokenizer.json" in capsys.readouterr().out
    assert m.main(["verify", str(tmp_path / "nowhere")]) == 1


def test_build_is_a_no_op_on_an_unchanged_folder_and_redone_on_a_new_file(tmp_path, capsys):
    d = _model(tmp_path)
    assert m.main(["build", str(d)]) == 0
    assert m.main(["build", str(d)]) == 0
    assert "unchanged" in capsys.readouterr().out
    (d / "extra.txt").write_text("new")
    assert m.main(["build", str(d)]) == 0
    assert "extra.txt" in json.loads((d / m.MANIFEST).read_text())["files"]


def test_a_read_only_check_names_the_file_that_changed_since_it_was_verified(tmp_path):
    """status hashes nothing (rehash=False), yet a same-size corruption is named by file."""
    d = _model(tmp_path)
    man = m.build(d)
    assert m.problems(d, man) == []
    data = bytearray((d / "model.safetensors").read_bytes())
    data[7] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(data))
    os.utime(d / "model.safetensors", ns=(1, 1))  # a different mtime, as any write leaves
    [issue] = m.problems(d, man, rehash=False)
    assert issue.startswith("model.safetensors: changed since it was last verified"), issue
    assert m.problems(d, man) == ["model.safetensors: sha256 differs"]
    (d / m.STAMP).unlink()
    assert m.problems(d, man, rehash=False) == ["not verified yet (sizes match; make models-check hashes every file)"]


def _shares(tmp_path):
    """A four-weight-file model and the manifest of a node that holds files 3 and 4."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    for i in range(1, 5):
        (d / f"model-0000{i}-of-00004.safetensors").write_bytes(os.urandom(1000 * i))
    whole = m.build(d)
    keep = ["config.json", "model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors"]
    return d, whole, m.node_manifest(whole, keep, [[6, 9], [9, 12]])


def test_a_node_manifest_is_the_share_with_its_layers(tmp_path):
    _, whole, share = _shares(tmp_path)
    assert sorted(share["files"]) == [
        "config.json",
        "model-00003-of-00004.safetensors",
        "model-00004-of-00004.safetensors",
    ]
    assert share["of_files"] == 5 and share["layers"] == [[6, 9], [9, 12]]
    assert m.share_bytes(share) == 2 + 3000 + 4000 and m.share_bytes(whole) == 2 + 10000
    assert m.node_manifest(whole, None) is whole  # tensor layouts, one-file models: every file
    assert m.share_label(share) == "share 3 of 5 files (layers 6-11)"  # two stages on one machine: one run
    assert m.share_label(whole) is None
    assert m.layer_ranges([[20, 24], [0, 6], [6, 12]]) == "0-11, 20-23" and m.layer_ranges([[5, 6]]) == "5"
    assert m.share_label({"files": {"a": {}}, "of_files": 4}) == "share 1 of 4 files"


def test_models_check_names_the_share_and_the_file_it_lacks(tmp_path, capsys):
    d, _, share = _shares(tmp_path)
    node = tmp_path / "node.json"
    node.write_text(json.dumps(share))
    (d / "model-00001-of-00004.safetensors").unlink()  # not in this node's share: fine
    (d / "model-00002-of-00004.safetensors").unlink()
    assert m.main(["verify", str(d), "--manifest", str(node)]) == 0
    assert capsys.readouterr().out == f"{d}: share 3 of 5 files (layers 6-11), verified\n"
    (d / "model-00004-of-00004.safetensors").unlink()
    assert m.main(["verify", str(d), "--manifest", str(node)]) == 1
    assert capsys.readouterr().out == (
        f"model-00004-of-00004.safetensors: missing\n{d}: share 3 of 5 files (layers 6-11), NOT verified (1 problem(s) above)\n"
    )
