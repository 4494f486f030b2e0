"""The catalog as callers see it: /workflow-list and /workflow-info."""
from __future__ import annotations

from typing import Any

from comfy.facade import Api

from .base import BaseHandler, api_error

# "inputs": the specified answer (input key -> spec); "full": the workflow's own description and timeout too,
# wrapped, so that a key beside the inputs can never be taken for one
VIEWS = ("inputs", "full")

class WorkflowListHandler(BaseHandler):
    """GET /workflow-list: the aliases on offer."""

    def get(self) -> None:
        """List every workflow alias."""
        self.write_json(self.services.catalog.aliases())


class WorkflowInfoHandler(BaseHandler):
    """GET /workflow-info?workflow=ALIAS[&view=full]: the inputs a caller may set (view=full: with the description)."""

    def get(self) -> None:
        """Describe the settable inputs of one workflow."""
        alias = self.get_query_argument("workflow", None)
        if not alias:
            raise api_error(400, "workflow is required, e.g. ?workflow=invert-image (see /workflow-list)")
        view = self.get_query_argument("view", "inputs")
        if view not in VIEWS:
            raise api_error(400, f"view must be one of {', '.join(VIEWS)}, got {view!r}")
        wf = self.services.catalog.get(alias)
        if wf is None:
            raise api_error(400, f"unknown workflow {alias!r} (see /workflow-list)")
        inputs = {key: spec.info() for key, spec in wf.inputs.items()}
        if view == "inputs":
            self.write_json(inputs)  # the specified shape: input key -> spec, nothing else
        else:
            self.write_json({"workflow": wf.alias, "description": wf.description, "timeout": wf.timeout,
                             "inputs": inputs})


def routes(services: Api) -> list[tuple[str, type, dict[str, Any]]]:
    """URL table of this module."""
    kw = {"services": services}
    return [
        (r"/workflow-list", WorkflowListHandler, kw),
        (r"/workflow-info", WorkflowInfoHandler, kw),
    ]
