"""manifest.json: what prepared data holds (sources, splits, shards, tokenizer) and what it was made from."""
from dataclasses import dataclass

from data_pipeline.errors import DataError
from data_pipeline.files import fingerprint
from data_pipeline.record import DataFile, PreparedRecord
from data_pipeline.shards import TokenStore
from data_pipeline.tokenizer import load_tokenizer, tokenizer_fingerprint

SPLITS = ("train", "validation")


@dataclass(frozen=True)
class Manifest(PreparedRecord, file="manifest.json", format=3, what="prepared data"):
    @property
    def fingerprint(self) -> str:
        return fingerprint(self.data["inputs_fingerprint"], self.data["tokenizer"]["fingerprint"])

    @property
    def vocab_size(self) -> int:
        return self.data["tokenizer"]["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.data["tokenizer"]["eos_id"]

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
        return TokenStore(self.dir, info["splits"][split]["shards"], self.data["dtype"], name=f"{info['name']} {split}",
                          vocab_size=self.vocab_size)

    def num_tokens(self, split: str, source: str | None = None) -> int:
        if source is None:
            return sum(s["splits"][split]["num_tokens"] for s in self.data["sources"])
        return self._source(source)["splits"][split]["num_tokens"]

    def files(self) -> list[DataFile]:
        return [DataFile(self.dir / shard["file"], shard["bytes"], shard["sha256"])
                for source in self.data["sources"] for split in SPLITS for shard in source["splits"][split]["shards"]]

    def verify(self) -> None:
        """Every shard has its recorded size and checksum, and the tokenizer is the one the shards were made with."""
        super().verify()
        self.check_tokenizer()

    def check_tokenizer(self) -> None:
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
