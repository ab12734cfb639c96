"""What the routes need, built once by the app's lifespan and kept on app.state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from server.engine.engine import AsyncEngine
from server.engine.loader import LoadedModel
from server.exceptions import ModelNotFound
from server.pipelines.categories import CategoriesPipeline
from server.pipelines.chat import ChatPipeline


@dataclass
class Services:
    loaded: LoadedModel
    engine: AsyncEngine
    chat: ChatPipeline
    categories: CategoriesPipeline
    served_model_names: tuple[str, ...]
    started_at: int = field(default_factory=lambda: int(time.time()))

    def check_model(self, name: str) -> None:
        if name not in self.served_model_names:
            raise ModelNotFound(name)


def get_services(request: Request) -> Services:
    return request.app.state.services
