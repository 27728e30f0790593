"""Request dependencies, declared once as `Annotated` aliases and reused by every route."""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.errors import ApiError
from core.jobs import ApiKey, find_api_key
from core.settings import Settings
from core.storage import ObjectStore


@dataclass
class Services:
    """What the app builds once at startup and every request shares."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: ObjectStore
    celery: Celery


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_settings(services: ServicesDep) -> Settings:
    return services.settings


def get_session(services: ServicesDep) -> Iterator[Session]:
    session = services.sessions()
    try:
        yield session
    finally:
        session.close()


def get_store(services: ServicesDep) -> ObjectStore:
    return services.store


def get_celery(services: ServicesDep) -> Celery:
    return services.celery


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[ObjectStore, Depends(get_store)]
CeleryDep = Annotated[Celery, Depends(get_celery)]

_bearer = HTTPBearer(auto_error=False, description="An API key from `sealer keys create --name NAME`.")


def get_api_key(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey:
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise ApiError(
            401,
            "unauthorized",
            "missing API key; send `Authorization: Bearer <key>` (create a key with `sealer keys create --name NAME`)",
            headers=challenge,
        )
    key = find_api_key(session, credentials.credentials)
    if key is None:
        raise ApiError(
            401,
            "unauthorized",
            "invalid or revoked API key; check the key or create a new one with `sealer keys create --name NAME`",
            headers=challenge,
        )
    return key


ApiKeyDep = Annotated[ApiKey, Depends(get_api_key)]
