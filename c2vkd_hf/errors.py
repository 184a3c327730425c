"""Error classes raised below the layer they belong to, in a module that imports nothing from the package."""


class TeacherCacheError(ValueError):
    """The teacher cache cannot be used as given (missing, incomplete, stale or foreign); the message
    says what differs and how to rebuild."""


__all__ = ["TeacherCacheError"]
