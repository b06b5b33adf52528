"""`ArtifactRef`: what a stage returns instead of data (DESIGN.md section 3)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ArtifactRef(BaseModel):
    """A small, JSON-serialisable pointer to an immutable artifact.

    `sha256` is the hash of the artifact's `_manifest.json`, which lists every part file with its own
    sha256, so this one hash pins every byte of the artifact. Two refs with the same sha256 name the same
    content; a stage's cache key is built from its inputs' sha256s.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str = Field(description="The artifact directory relative to the storage root (`artifacts/<stage>/<key>`); "
                     "informative: a store finds an artifact by stage and key under its own root "
                     "(`ArtifactStore.path_of`).")
    stage: str
    key: str = Field(description="The cache key the artifact was published under.")
    sha256: str = Field(description="sha256 of the artifact's _manifest.json.")
    rows: int = Field(ge=0, description="Total table rows (0 for an artifact without tables).")
    bytes: int = Field(ge=0, description="Total bytes of the part files.")
    schema_name: str = Field(description="The table's schema name; with several tables their names joined by '+' "
                             "(e.g. 'probes+tokens'), with none 'files'.")
    schema_version: int = Field(ge=0)

    def short(self) -> str:
        return f"{self.stage}/{self.key[:12]} ({self.rows} rows, {self.bytes} B, sha256 {self.sha256[:12]})"
