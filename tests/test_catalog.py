"""The workflow catalog: aliases, the manifest, /workflow-info entries, validation, build and enrichment."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest

from comfy.catalog import Catalog, InputError, Workflow

ROOT = Path(__file__).resolve().parent.parent

# A small API-format graph: literal inputs of each type, linked inputs, a file input, a boolean.
GRAPH: dict[str, Any] = {
    "3": {"class_type": "KSampler", "_meta": {"title": "My Sampler"},
          "inputs": {"seed": 5, "steps": 20, "cfg": 8.0, "sampler_name": "euler", "scheduler": "normal",
                     "model": ["4", 0], "positive": ["6", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "_meta": {"title": "Positive"},
          "inputs": {"text": "a cat", "clip": ["4", 1]}},
    "10": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
    "12": {"class_type": "SomeToggle", "inputs": {"enabled": True}},
}

MANIFEST = """
paint:
  file: graph.json
  inputs:
    - "6/text"
    - "3/seed"
    - "3/cfg"
    - "3/sampler_name"
    - "10/image"
"""

# /object_info as a ComfyUI backend answers it (old and new combo forms).
OBJECT_INFO: dict[str, Any] = {
    "KSampler": {"display_name": "KSampler", "input": {"required": {
        "model": ["MODEL"],
        "seed": ["INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}],
        "steps": ["INT", {"default": 20, "min": 1, "max": 10000}],
        "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}],
        "sampler_name": [["euler", "dpmpp_2m"], {}],
        "scheduler": ["COMBO", {"options": ["normal", "karras"]}]}}},
    "CLIPTextEncode": {"display_name": "CLIP Text Encode (Prompt)", "input": {"required": {
        "text": ["STRING", {"multiline": True, "dynamicPrompts": True}], "clip": ["CLIP"]}}},
    "LoadImage": {"display_name": "Load Image", "input": {"required": {
        "image": [["example.png", "backend_only.png"], {"image_upload": True}]}}},
}


def folder(tmp_path: Path, graphs: dict[str, Any] | None = None, manifest: str | None = None) -> Path:
    """A workflows folder with the given {file name: graph or raw text} and optional workflows.yaml."""
    root = tmp_path / "workflows"
    root.mkdir()
    for name, graph in (graphs if graphs is not None else {"graph.json": GRAPH}).items():
        (root / name).write_text(graph if isinstance(graph, str) else json.dumps(graph), encoding="utf-8")
    if manifest is not None:
        (root / "workflows.yaml").write_text(manifest, encoding="utf-8")
    return root


@pytest.fixture
def paint(tmp_path: Path) -> Workflow:
    """The "paint" workflow of GRAPH with five offered inputs."""
    wf = Catalog.load(folder(tmp_path, manifest=MANIFEST)).get("paint")
    assert wf is not None
    return wf


# aliases and the manifest ----------------------------------------------------------------------

def test_without_manifest_every_json_is_offered_under_its_stem_with_no_inputs(tmp_path: Path) -> None:
    root = folder(tmp_path, {"text-to-image.json": GRAPH, "blank.json": GRAPH, "notes.txt": "ignored"})
    catalog = Catalog.load(root, default_timeout=42)
    assert catalog.aliases() == ["blank", "text-to-image"]
    wf = catalog.get("text-to-image")
    assert wf is not None and wf.inputs == {} and wf.timeout == 42.0
    assert wf.graph == GRAPH
    assert catalog.get("notes") is None and catalog.get(None) is None


def test_manifest_renames_and_designates_inputs(tmp_path: Path) -> None:
    root = folder(tmp_path, {"graph.json": GRAPH, "other.json": GRAPH}, MANIFEST + "  timeout: 30\n")
    catalog = Catalog.load(root)
    # graph.json is offered only under its manifest alias; other.json keeps its stem
    assert catalog.aliases() == ["other", "paint"]
    wf = catalog.get("paint")
    assert wf is not None
    assert list(wf.inputs) == ["6/text", "3/seed", "3/cfg", "3/sampler_name", "10/image"]
    assert wf.timeout == 30.0
    assert catalog.get("other").inputs == {}  # type: ignore[union-attr]


def test_manifest_entry_without_file_uses_alias_dot_json(tmp_path: Path) -> None:
    catalog = Catalog.load(folder(tmp_path, {"paint.json": GRAPH}, 'paint:\n  inputs: ["6/text"]\n'))
    assert list(catalog.get("paint").inputs) == ["6/text"]  # type: ignore[union-attr]


def test_workflow_info_shape(paint: Workflow) -> None:
    info = {key: spec.info() for key, spec in paint.inputs.items()}
    assert info["6/text"] == {"type": "str", "title": "Positive", "class": "CLIPTextEncode", "default": "a cat"}
    assert info["3/seed"] == {"type": "int", "title": "My Sampler", "class": "KSampler", "default": 5}
    assert info["3/cfg"] == {"type": "float", "title": "My Sampler", "class": "KSampler", "default": 8.0}
    # no _meta title: the class name is the title; LoadImage/image names a file to upload
    assert info["10/image"] == {"type": "str", "title": "LoadImage", "class": "LoadImage",
                                "default": "example.png", "upload": True}
    assert json.loads(json.dumps(info)) == info  # what /workflow-info sends is plain JSON


def test_mapping_entries_override_what_the_graph_implies(tmp_path: Path) -> None:
    manifest = """
paint:
  file: graph.json
  inputs:
    - {key: "3/seed", title: Seed, min: 0, max: 1000, description: "Same seed, same picture"}
    - {key: "3/steps", type: float, step: 0.5}
    - {key: "3/sampler_name", choices: [euler, heun]}
    - {key: "6/text", multiline: true}
    - {key: "4/ckpt_name", upload: true}
    - {key: "12/enabled", type: int}
"""
    wf = Catalog.load(folder(tmp_path, manifest=manifest)).get("paint")
    assert wf is not None
    info = {key: spec.info() for key, spec in wf.inputs.items()}
    assert info["3/seed"] == {"type": "int", "title": "Seed", "class": "KSampler", "default": 5,
                              "min": 0, "max": 1000, "description": "Same seed, same picture"}
    assert info["3/steps"]["type"] == "float" and info["3/steps"]["step"] == 0.5
    assert info["3/sampler_name"]["choices"] == ["euler", "heun"]
    assert info["6/text"]["multiline"] is True
    assert info["4/ckpt_name"]["upload"] is True
    assert info["12/enabled"]["type"] == "int"  # a boolean input is offered once it is given a type


# a broken entry is left out, the rest serves --------------------------------------------------------------

UI_FORMAT = {"last_node_id": 9, "nodes": [{"id": 3, "type": "KSampler"}], "links": [[1, 4, 0, 3, 0, "MODEL"]]}


@pytest.mark.parametrize(("graphs", "manifest", "words"), [
    pytest.param(None, "paint:\n  file: missing.json\n", ["paint.file", "missing.json"], id="missing-file"),
    pytest.param(None, 'paint:\n  file: graph.json\n  inputs: ["99/text"]\n', ["99/text", "'99'"],
                 id="missing-node"),
    pytest.param(None, 'paint:\n  file: graph.json\n  inputs: ["6/txet"]\n', ["6/txet", "'txet'"],
                 id="missing-input"),
    pytest.param(None, 'paint:\n  file: graph.json\n  inputs: ["6/clip"]\n', ["6/clip", "linked"],
                 id="linked-input"),
    pytest.param(None, 'paint:\n  file: graph.json\n  inputs: ["12/enabled"]\n', ["12/enabled", "boolean"],
                 id="boolean-without-type"),
    pytest.param(None, 'paint:\n  file: graph.json\n  inputs: ["6text"]\n', ["6text", "<node id>/<input name>"],
                 id="key-without-slash"),
    pytest.param(None, 'paint:\n  file: graph.json\n  inputs: [{key: "3/seed", type: bool}]\n',
                 ["3/seed", "type"], id="unknown-type"),
    pytest.param(None, 'paint:\n  file: graph.json\n  inputs: [{key: "3/seed", minimum: 0}]\n',
                 ["3/seed", "minimum"], id="unknown-override"),
    pytest.param(None, 'paint:\n  file: graph.json\n  inputs: [{key: "3/seed", min: zero}]\n',
                 ["3/seed", "min"], id="min-not-number"),
    pytest.param(None, "paint:\n  file: graph.json\n  timeout: soon\n", ["paint.timeout"], id="timeout-text"),
    pytest.param(None, "paint:\n  file: graph.json\n  timeout: 0\n", ["paint.timeout"], id="timeout-zero"),
    pytest.param(None, "paint:\n  file: graph.json\n  timeout: -5\n", ["paint.timeout"], id="timeout-negative"),
    pytest.param(None, "paint:\n  file: graph.json\n  timeout: true\n", ["paint.timeout"], id="timeout-bool"),
    pytest.param(None, "paint:\n  file: graph.json\n  timout: 5\n", ["paint.timout"], id="unknown-entry-key"),
    pytest.param(None, "paint:\n  file: [graph.json]\n", ["paint.file"], id="file-not-a-string"),
    pytest.param(None, "paint: [oops\n", ["workflows.yaml"], id="manifest-not-yaml"),
    pytest.param({"ui.json": UI_FORMAT}, None, ["ui.json", "API Format"], id="ui-format"),
    pytest.param({"bad.json": '{"3": {"class_type": "KSampler",'}, None, ["bad.json", "JSON"],
                 id="invalid-json"),
    pytest.param({"bad.json": {"3": {"inputs": {}}}}, None, ["bad.json", "'3'", "class_type"],
                 id="node-without-class"),
    pytest.param({"empty.json": {}}, None, ["empty.json"], id="empty-graph"),
])
def test_broken_entry_is_left_out_and_named_while_the_rest_serves(
        tmp_path: Path, graphs: dict[str, Any] | None, manifest: str | None, words: list[str]) -> None:
    root = folder(tmp_path, graphs, manifest)
    (root / "good.json").write_text(json.dumps({"1": {"class_type": "EmptyImage", "inputs": {"width": 8}}}))
    catalog = Catalog.load(root)
    assert "good" in catalog.workflows  # a bad edit never takes the other workflows down
    assert "paint" not in catalog.workflows
    report = " | ".join(f"{k}: {v}" for k, v in catalog.errors.items())
    assert len(catalog.errors) == 1, report
    for word in words:
        assert word in report, report


def test_missing_workflows_folder_is_reported(tmp_path: Path) -> None:
    catalog = Catalog.load(tmp_path / "nowhere")
    assert catalog.workflows == {}
    assert "workflows_dir" in catalog.errors["workflows_dir"]


def test_a_broken_entry_does_not_offer_its_file_under_the_stem(tmp_path: Path) -> None:
    catalog = Catalog.load(folder(tmp_path, manifest='paint:\n  file: graph.json\n  inputs: ["99/text"]\n'))
    assert catalog.aliases() == [] and list(catalog.errors) == ["paint"]


# validating a caller's values ------------------------------------------------------------------

def test_unknown_key_lists_the_allowed_keys(paint: Workflow) -> None:
    with pytest.raises(InputError) as info:
        paint.validate({"workflow": "paint", "6/txt": "a dog"}, 100)
    message = str(info.value)
    assert "'6/txt'" in message
    for key in paint.inputs:
        assert key in message


def test_valid_values_pass_and_workflow_key_is_ignored(paint: Workflow) -> None:
    body = {"workflow": "paint", "6/text": "a dog", "3/seed": 2**64 - 1, "3/cfg": 7, "10/image": "up.png"}
    values = paint.validate(body, 100)
    assert values == {"6/text": "a dog", "3/seed": 2**64 - 1, "3/cfg": 7.0, "10/image": "up.png"}
    assert isinstance(values["3/cfg"], float)
    assert paint.validate({"workflow": "paint"}, 100) == {}


@pytest.mark.parametrize(("key", "value"), [
    pytest.param("3/seed", "5", id="str-for-int"),
    pytest.param("3/seed", 1.5, id="float-for-int"),
    pytest.param("3/seed", True, id="bool-for-int"),
    pytest.param("3/seed", None, id="null-for-int"),
    pytest.param("3/seed", [5], id="list-for-int"),
    pytest.param("3/cfg", "7.5", id="str-for-float"),
    pytest.param("3/cfg", False, id="bool-for-float"),
    pytest.param("3/cfg", math.nan, id="nan"),
    pytest.param("3/cfg", math.inf, id="inf"),
    pytest.param("3/cfg", -math.inf, id="minus-inf"),
    pytest.param("3/cfg", 10**400, id="int-too-big-for-float"),
    pytest.param("6/text", 5, id="int-for-str"),
    pytest.param("6/text", {"a": 1}, id="object-for-str"),
])
def test_wrong_types_are_refused_naming_the_input(paint: Workflow, key: str, value: Any) -> None:
    with pytest.raises(InputError) as info:
        paint.validate({"workflow": "paint", key: value}, 100)
    assert key in str(info.value)


def test_min_max_and_choices(tmp_path: Path) -> None:
    manifest = """
paint:
  file: graph.json
  inputs:
    - {key: "3/steps", min: 1, max: 50}
    - {key: "3/cfg", min: 0.5, max: 30.0}
    - {key: "3/sampler_name", choices: [euler, heun]}
"""
    wf = Catalog.load(folder(tmp_path, manifest=manifest)).get("paint")
    assert wf is not None
    assert wf.validate({"3/steps": 1, "3/cfg": 30, "3/sampler_name": "heun"}, 100) == \
        {"3/steps": 1, "3/cfg": 30.0, "3/sampler_name": "heun"}
    for body, words in [({"3/steps": 0}, ["3/steps", "minimum"]), ({"3/steps": 51}, ["3/steps", "maximum"]),
                        ({"3/cfg": 0.4}, ["3/cfg", "minimum"]), ({"3/cfg": 30.01}, ["3/cfg", "maximum"]),
                        ({"3/sampler_name": "ddim"}, ["3/sampler_name", "euler", "heun"])]:
        with pytest.raises(InputError) as info:
            wf.validate(body, 100)
        for word in words:
            assert word in str(info.value)


def test_string_longer_than_max_len_is_refused(paint: Workflow) -> None:
    assert paint.validate({"6/text": "x" * 10}, 10) == {"6/text": "x" * 10}
    with pytest.raises(InputError, match="6/text.*10"):
        paint.validate({"6/text": "x" * 11}, 10)


def test_build_puts_values_into_a_copy(paint: Workflow) -> None:
    before = copy.deepcopy(paint.graph)
    prompt = paint.build(paint.validate({"6/text": "a dog", "3/seed": 7, "10/image": "up.png"}, 100))
    assert prompt["6"]["inputs"] == {"text": "a dog", "clip": ["4", 1]}
    assert prompt["3"]["inputs"]["seed"] == 7
    assert prompt["3"]["inputs"]["cfg"] == 8.0
    assert prompt["10"]["inputs"]["image"] == "up.png"
    assert paint.graph == before
    prompt["3"]["inputs"]["model"].append("mutated")
    assert paint.graph == before  # linked inputs are not shared with the catalog either
    assert paint.build({}) == before


# enrichment from a backend's /object_info -------------------------------------------------------

def test_enrich_adds_bounds_choices_and_display_names(tmp_path: Path) -> None:
    manifest = MANIFEST + '    - "3/steps"\n    - "3/scheduler"\n'
    catalog = Catalog.load(folder(tmp_path, manifest=manifest))
    catalog.enrich(OBJECT_INFO)
    wf = catalog.get("paint")
    assert wf is not None
    info = {key: spec.info() for key, spec in wf.inputs.items()}
    assert info["3/sampler_name"]["choices"] == ["euler", "dpmpp_2m"]      # [[...], {}] form
    assert info["3/scheduler"]["choices"] == ["normal", "karras"]          # ["COMBO", {"options"}] form
    assert (info["3/steps"]["min"], info["3/steps"]["max"]) == (1, 10000)
    assert (info["3/cfg"]["min"], info["3/cfg"]["max"], info["3/cfg"]["step"]) == (0.0, 100.0, 0.1)
    assert info["3/seed"]["max"] == 0xFFFFFFFFFFFFFFFF
    assert info["6/text"]["multiline"] is True
    assert info["6/text"]["title"] == "Positive"           # the graph's _meta title is kept
    assert info["10/image"]["title"] == "Load Image"       # display_name replaces a bare class name
    assert "choices" not in info["10/image"]               # callers name their own uploads
    assert wf.validate({"10/image": "my_upload.png"}, 100) == {"10/image": "my_upload.png"}
    with pytest.raises(InputError, match="3/sampler_name"):
        wf.validate({"3/sampler_name": "heun"}, 100)
    with pytest.raises(InputError, match="3/steps"):
        wf.validate({"3/steps": 0}, 100)


def test_manifest_overrides_win_over_enrichment(tmp_path: Path) -> None:
    manifest = """
paint:
  file: graph.json
  inputs:
    - {key: "3/steps", min: 5, title: Steps}
    - {key: "3/sampler_name", choices: [euler]}
    - {key: "10/image", title: Your photo}
"""
    catalog = Catalog.load(folder(tmp_path, manifest=manifest))
    catalog.enrich(OBJECT_INFO)
    wf = catalog.get("paint")
    assert wf is not None
    steps = wf.inputs["3/steps"].info()
    assert (steps["title"], steps["min"], steps["max"]) == ("Steps", 5, 10000)
    assert wf.inputs["3/sampler_name"].info()["choices"] == ["euler"]
    assert wf.inputs["10/image"].info()["title"] == "Your photo"


def test_enrich_ignores_unknown_classes_and_odd_entries(tmp_path: Path) -> None:
    catalog = Catalog.load(folder(tmp_path, manifest=MANIFEST))
    before = {k: s.info() for k, s in catalog.get("paint").inputs.items()}  # type: ignore[union-attr]
    catalog.enrich({"KSampler": "not a dict", "CLIPTextEncode": {"input": {"required": {"text": []}}}})
    assert {k: s.info() for k, s in catalog.get("paint").inputs.items()} == before  # type: ignore[union-attr]


def test_enrich_makes_a_float_input_float_even_when_the_export_wrote_8_for_8_0(tmp_path: Path) -> None:
    # ComfyUI's "Save (API Format)" is written by JavaScript, which serialises 8.0 as 8.
    graph = copy.deepcopy(GRAPH)
    graph["3"]["inputs"]["cfg"] = 8
    catalog = Catalog.load(folder(tmp_path, {"graph.json": graph}, MANIFEST))
    catalog.enrich(OBJECT_INFO)
    wf = catalog.get("paint")
    assert wf is not None
    assert wf.inputs["3/cfg"].info()["type"] == "float"
    assert wf.validate({"3/cfg": 7.5}, 100) == {"3/cfg": 7.5}


# the shipped catalog --------------------------------------------------------------------------

def test_shipped_workflows_offer_what_api_md_promises() -> None:
    catalog = Catalog.load(ROOT / "workflows")
    assert {"text-to-image", "image-to-image", "invert-image", "blank-canvas"} <= set(catalog.aliases())

    t2i = catalog.get("text-to-image")
    i2i = catalog.get("image-to-image")
    invert = catalog.get("invert-image")
    blank = catalog.get("blank-canvas")
    assert t2i and i2i and invert and blank

    for wf in (t2i, i2i):
        text = wf.inputs["6/text"].info()
        assert (text["type"], text["class"], text["title"]) == ("str", "CLIPTextEncode", "CLIP Text Encode (Prompt)")
        assert isinstance(text["default"], str) and text["default"]
    assert t2i.inputs["6/text"].default.startswith("beautiful scenery nature glass bottle landscape")

    image = i2i.inputs["10/image"].info()
    assert (image["type"], image["class"], image["title"], image.get("upload")) == \
        ("str", "LoadImage", "Load Image", True)
    assert (ROOT / "workflows" / image["default"]).is_file()  # the default runs on a fresh backend

    assert t2i.inputs["3/seed"].info()["type"] == "int"
    assert i2i.inputs["15/seed"].info()["type"] == "int"     # API.md's example body sets "15/seed"
    assert i2i.validate({"6/text": "the awesome cat", "10/image": "a_photo_of_my_face.png", "15/seed": 1234},
                        10_000)
    assert invert.inputs["1/image"].upload
    assert {"1/width", "1/height"} <= set(blank.inputs)
