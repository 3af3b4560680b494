"""manifest.json: what prepared data holds (sources, splits, shards, tokenizer) and what it was made from."""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.errors import DataError
from data_pipeline.shards import TokenStore
from data_pipeline.tokenizer import load_tokenizer, tokenizer_fingerprint

FORMAT = 2
SPLITS = ("train", "validation")


def read_record(prepared_dir: str | Path, name: str, format: int, what: str) -> dict:
    """The JSON record that prepare writes last into prepared_dir: its presence means the data is complete."""
    path = Path(prepared_dir) / name
    if not path.exists():
        raise DataError(f"data.prepared_dir: no {what} at {prepared_dir} ({name} missing); run `zerotrain prepare CONFIG`")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if record.get("format") != format:
        raise DataError(f"{path}: format {record.get('format')!r}, this zerotrain reads format {format}; "
                        "prepare the data again")
    return record


@dataclass(frozen=True)
class Manifest:
    dir: Path
    data: dict  # the parsed manifest.json

    @classmethod
    def load(cls, prepared_dir: str | Path) -> "Manifest":
        return cls(Path(prepared_dir), read_record(prepared_dir, "manifest.json", FORMAT, "prepared data"))

    @property
    def fingerprint(self) -> str:
        """Identity of the token streams (inputs and tokenizer), recorded in checkpoints."""
        both = self.data["inputs_fingerprint"] + self.data["tokenizer"]["fingerprint"]
        return hashlib.sha256(both.encode()).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.data["tokenizer"]["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.data["tokenizer"]["eos_id"]

    @property
    def tokenizer_dir(self) -> Path:
        return self.dir / self.data["tokenizer"]["path"]

    @property
    def sources(self) -> list[str]:
        return [s["name"] for s in self.data["sources"]]

    @property
    def weights(self) -> list[float]:
        """The mixture weights; without configured weights, each source's share of the training tokens."""
        sources = self.data["sources"]
        if sources[0]["weight"] is None:
            return [s["splits"]["train"]["num_tokens"] / self.num_tokens("train") for s in sources]
        return [s["weight"] for s in sources]

    def store(self, split: str, source: str | None = None) -> TokenStore:
        """One source's split as one token array; `source` may be omitted when there is only one."""
        info = self._source(source)
        return TokenStore(self.dir, info["splits"][split]["shards"], self.data["dtype"], name=f"{info['name']} {split}")

    def num_tokens(self, split: str, source: str | None = None) -> int:
        if source is None:
            return sum(s["splits"][split]["num_tokens"] for s in self.data["sources"])
        return self._source(source)["splits"][split]["num_tokens"]

    def verify(self) -> None:
        """Every shard has its recorded size and checksum, and the tokenizer is the one the shards were made with."""
        for source in self.sources:
            for split in SPLITS:
                self.store(split, source).verify()
        if tokenizer_fingerprint(load_tokenizer(self.tokenizer_dir)) != self.data["tokenizer"]["fingerprint"]:
            raise DataError(f"{self.tokenizer_dir}: tokenizer differs from the one the shards were made with")

    def _source(self, name: str | None) -> dict:
        sources = self.data["sources"]
        if name is None and len(sources) == 1:
            return sources[0]
        for s in sources:
            if s["name"] == name:
                return s
        raise KeyError(f"{self.dir}: no source {name!r} (has {', '.join(self.sources)})")
