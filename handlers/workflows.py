"""The catalog as callers see it: /workflow-list and /workflow-info."""
from __future__ import annotations

from typing import Any


from comfy.services import Services

from .base import BaseHandler, api_error


class WorkflowListHandler(BaseHandler):
    """GET /workflow-list: the aliases on offer."""

    def get(self) -> None:
        """List every workflow alias."""
        self.write_json(self.services.catalog.aliases())


class WorkflowInfoHandler(BaseHandler):
    """GET /workflow-info?workflow=ALIAS: the inputs a caller may set."""

    def get(self) -> None:
        """Describe the settable inputs of one workflow."""
        alias = self.get_query_argument("workflow", None)
        if not alias:
            raise api_error(400, "workflow is required, e.g. ?workflow=invert-image (see /workflow-list)")
        wf = self.services.catalog.get(alias)
        if wf is None:
            raise api_error(400, f"unknown workflow {alias!r} (see /workflow-list)")
        self.write_json({key: spec.info() for key, spec in wf.inputs.items()})


def routes(services: Services) -> list[tuple[str, type, dict[str, Any]]]:
    """URL table of this module."""
    kw = {"services": services}
    return [
        (r"/workflow-list", WorkflowListHandler, kw),
        (r"/workflow-info", WorkflowInfoHandler, kw),
    ]
