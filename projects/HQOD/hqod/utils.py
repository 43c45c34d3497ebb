"""Small helpers shared by the package."""

__all__ = ["all_subclasses"]


def all_subclasses(cls) -> set:
    """Every class defined so far that derives from ``cls``, directly or not."""
    found, todo = set(), [cls]
    while todo:
        new = [c for c in todo.pop().__subclasses__() if c not in found]
        found.update(new)
        todo += new
    return found
