"""The prompt store: prompts people add, and the images generated from them (SQLAlchemy; SQLite or Postgres).

    store = open_store("sqlite:///prompts.db")     # upgrades the schema to the newest migration first
    ids = store.add([parse_prompt({"text": "a red circle", "condition_image": "sketch.png"}, GenerationConfig())])
    store.pending("shapes", "3")                    # prompt ids with images still missing for that version

Tables and their meaning: pipeline/generation/prompt_store/models.py. Schema changes: Alembic migrations in
pipeline/generation/prompt_store/migrations/versions/ (a new one: `alembic -x url=... revision --autogenerate` with
`alembic_config()` from store.py, or write it by hand like 0001_initial.py).
"""

from pipeline.generation.prompt_store.store import (
    PromptStore,
    import_file,
    migrate,
    open_store,
    parse_prompt,
    problems,
    read_doodle,
    store_url,
)

__all__ = ["PromptStore", "import_file", "migrate", "open_store", "parse_prompt", "problems",
           "read_doodle", "store_url"]
