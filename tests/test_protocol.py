"""comfy/protocol.py: ComfyUI answers of every release turned into typed values and readable failure texts."""
from __future__ import annotations

from comfy.protocol import (Capabilities, describe_prompt_error, file_entries, history_status, job_status, outcome,
                            system_info)


def test_missing_node_type_names_node_title_and_class() -> None:
    body = {"error": {"type": "missing_node_type", "message": "Node 'My Loader' not found. The custom node may "
                      "not be installed.", "details": "Node ID '#41'",
                      "extra_info": {"node_id": "41", "class_type": "FancyLoader", "node_title": "My Loader"}},
            "node_errors": {}}
    assert describe_prompt_error(body) == \
        "node 41 ('My Loader'): node class FancyLoader is not installed on this backend"
    body["error"]["extra_info"] = {"node_id": "7", "class_type": None, "node_title": None}
    assert describe_prompt_error(body) == "node 7 has no class_type (the workflow file is damaged)"


def test_the_0_3_64_form_of_a_missing_class_reads_the_same() -> None:
    body = {"error": {"type": "invalid_prompt", "message": "Cannot execute because node FancyLoader does not exist.",
                      "details": "Node ID '#41'", "extra_info": {}}, "node_errors": []}
    assert describe_prompt_error(body) == "node 41: node class FancyLoader is not installed on this backend"


def test_cycles_unknown_types_and_plain_strings_stay_readable() -> None:
    cycle = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                       "details": "", "extra_info": {}},
             "node_errors": {"1": {"class_type": "A", "dependent_outputs": [], "errors": [
                 {"type": "dependency_cycle", "message": "Dependency cycle detected", "details": "1 (A) -> 2 (B) -> 1 (A)",
                  "extra_info": {"node_id": "1", "cycle_nodes": ["1", "2"]}}]}}}
    assert describe_prompt_error(cycle) == ("Prompt outputs failed validation; node 1 (A): Dependency cycle "
                                            "detected: 1 (A) -> 2 (B) -> 1 (A)")
    odd = {"error": {"type": "loop_escape_detected", "extra_info": {"loop_error_type": "loop_escape"}},
           "node_errors": {"5": {"class_type": "Loop", "errors": [{"type": "invalid_dynamic_input"}]}}}
    assert describe_prompt_error(odd) == "loop_escape_detected; node 5 (Loop): invalid_dynamic_input"
    assert describe_prompt_error({"error": "prompt_id already exists"}) == "prompt_id already exists"
    uuid_error = {"error": {"type": "invalid_prompt_id", "message": "prompt_id must be a valid UUID",
                            "details": "use a lowercase UUID", "extra_info": {}}, "node_errors": {}}
    assert describe_prompt_error(uuid_error) == "prompt_id must be a valid UUID: use a lowercase UUID"
    assert describe_prompt_error(["not", "a", "dict"]) == ""


def test_jobs_api_answers() -> None:
    assert not job_status(404, {"error": "Job not found"}).known  # type: ignore[union-attr]
    running = job_status(200, {"id": "x", "status": "in_progress", "priority": 3})
    assert running is not None and running.known and not running.finished
    assert job_status(500, None) is None and job_status(200, {"jobs": []}) is None
    failed = job_status(200, {"id": "x", "status": "failed", "execution_error": {
        "node_type": "KSampler", "exception_message": "CUDA out of memory\nmore"}})
    assert failed is not None and failed.entry is not None
    assert outcome(failed.entry) == ("error", "KSampler failed: CUDA out of memory")
    cancelled = job_status(200, {"id": "x", "status": "cancelled"})
    assert cancelled is not None and cancelled.entry is not None and outcome(cancelled.entry)[0] == "interrupted"
    status = {"status_str": "success", "completed": True, "messages": []}
    done = job_status(200, {"status": "completed", "execution_status": status, "outputs": {"9": {}}})
    assert done is not None and done.entry == {"outputs": {"9": {}}, "status": status}


def test_history_entries_and_output_keys() -> None:
    assert history_status(None).state == "not_finished" and history_status(None).known
    assert history_status({"status": {"status_str": "success", "completed": True}}).finished
    node = {"images": [{"filename": "a.png", "subfolder": "", "type": "output", "id": "u", "preview_id": "u",
                        "metadata": {"kind": "image", "width": 8, "height": 8}}, {"no": "file"}, "text"],
            "text": ["hello"], "3d": "not-a-list"}
    assert [e["filename"] for e in file_entries(node)] == ["a.png"]


def test_system_stats() -> None:
    assert system_info({"system": {"comfyui_version": "0.38.1", "os": "win32"}}) == ("0.38.1", "win32")
    assert system_info({"devices": []}) == (None, None)
    assert Capabilities().describe()["cancel_with"] == "/queue delete + /interrupt"
