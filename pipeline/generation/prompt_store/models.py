"""The prompt store's tables (SQLAlchemy 2.x ORM). The schema itself is created and changed only by the Alembic
migrations in migrations/versions/; tests/test_prompts_store.py checks that these models and the migrated
schema agree.

    prompts   what people asked for: text + generation parameters + priority + status of its latest run; a prompt
              may carry a condition image (a doodle), stored as its bytes so a run months later needs no file
    outputs   one row per generated image, unique on (prompt, model name, model version, seed)
    failures  why a prompt could not be generated for a model version; `blocking` ones (the prompt itself is
              bad for that model, or the coverage policy skipped it) keep it out of later runs for that version
              until `diffuse prompts retry`; transient ones (storage down) do not
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# named constraints: Alembic migrations (and SQLite batch mode) can refer to them by name
NAMING = {"ix": "ix_%(column_0_label)s", "uq": "uq_%(table_name)s_%(column_0_name)s",
          "ck": "ck_%(table_name)s_%(constraint_name)s",
          "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s", "pk": "pk_%(table_name)s"}

PENDING, DONE, FAILED, SKIPPED = "pending", "done", "failed", "skipped"
STATUSES = (PENDING, DONE, FAILED, SKIPPED)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Prompt(Base):
    __tablename__ = "prompts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    text: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text, default="")
    sampler: Mapped[str] = mapped_column(String(16))
    steps: Mapped[int] = mapped_column(Integer)
    guidance: Mapped[float] = mapped_column(Float)
    size: Mapped[int | None] = mapped_column(Integer, nullable=True)  # square side in px; None = the model's own
    seed: Mapped[int] = mapped_column(BigInteger)  # image k of the prompt uses seed + k
    num_images: Mapped[int] = mapped_column(Integer)
    init_image_uri: Mapped[str | None] = mapped_column(Text, nullable=True)  # img2img: local path or s3:// URI
    strength: Mapped[float | None] = mapped_column(Float, nullable=True)
    # a doodle for models trained with a condition image: the file's bytes as added, and their sha256
    condition_image: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    condition_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)  # higher first
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # the outcome of the latest generation run that processed the prompt (pending until one did)
    status: Mapped[str] = mapped_column(String(16), default=PENDING, index=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.num_images))

    def params(self) -> dict:
        return {"sampler": self.sampler, "steps": self.steps, "guidance": self.guidance, "size": self.size,
                "seed": self.seed, "num_images": self.num_images, "init_image_uri": self.init_image_uri,
                "strength": self.strength, "condition_sha256": self.condition_sha256}


class Output(Base):
    __tablename__ = "outputs"
    __table_args__ = (UniqueConstraint("prompt_id", "model_name", "model_version", "seed",
                                       name="uq_outputs_prompt_model_seed"),
                      Index("ix_outputs_model", "model_name", "model_version"),
                      Index("ix_outputs_run_id", "run_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"))
    model_name: Mapped[str] = mapped_column(String(255))
    model_version: Mapped[str] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    image_uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    settings: Mapped[dict] = mapped_column(JSON)  # the effective sampler/steps/guidance/size/init/strength/doodle
    generate_seconds: Mapped[float] = mapped_column(Float)  # this image's share of its batch's sampling time
    write_seconds: Mapped[float] = mapped_column(Float)
    coverage_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    coverage: Mapped[str] = mapped_column(Text)  # in_span | outside_span | skipped: <why>
    run_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Failure(Base):
    __tablename__ = "failures"
    __table_args__ = (Index("ix_failures_prompt_model", "prompt_id", "model_name", "model_version"),
                      Index("ix_failures_run_id", "run_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"))
    model_name: Mapped[str] = mapped_column(String(255))
    model_version: Mapped[str] = mapped_column(String(64))
    run_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # invalid | transient | skipped
    reason: Mapped[str] = mapped_column(Text)
    blocking: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
