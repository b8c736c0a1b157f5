"""The store: the only layer that speaks SQL. One interface (`base.Store`), one driver per database."""

from conveyor.store.base import Store, Tx
from conveyor.store.open import open_store

__all__ = ["Store", "Tx", "open_store"]
