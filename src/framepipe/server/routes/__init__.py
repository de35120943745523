"""The service's routes, one :class:`fastapi.APIRouter` per resource; ``create_app`` includes
them (those under ``/api`` behind the bearer token)."""

__all__: list[str] = []
