"""Prompts over a vocabulary split: what a synthesis run turns into images, masks and features.

Every sample is a function of its id alone: its categories, its template and its generation seed
come from a random generator seeded with the id, so the same config always yields the same
samples, in any order, on any number of GPUs.
"""

from __future__ import annotations

import random
import string
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch.utils.data import Dataset

from grounded_diffusion.data.sources import check_counts, fingerprint_values, sample_seed, select_items
from grounded_diffusion.data.vocabulary import CategorySplit
from grounded_diffusion.errors import ConfigError
from grounded_diffusion.files import read_text_file

ONE_OBJECT_TEMPLATE = "a photograph of a {c1}"
TWO_OBJECT_TEMPLATE = "a photograph of a {c1} and a {c2}"

# Test groups of paper Tab. 1: how many seen and how many unseen categories a sample names.
GROUP_SIZES = {
    "one_seen": (1, 0),
    "one_unseen": (0, 1),
    "two_seen": (2, 0),
    "two_seen_unseen": (1, 1),
    "two_unseen": (0, 2),
}
GROUPS = tuple(GROUP_SIZES)
SEEN_GROUPS = ("one_seen", "two_seen")


def group_of(categories: Sequence[str], unseen: Sequence[str]) -> str:
    """The Tab. 1 group of a sample with these categories."""
    num_unseen = sum(c in unseen for c in categories)
    if len(categories) == 1:
        return "one_unseen" if num_unseen else "one_seen"
    if len(categories) == 2:
        return ("two_seen", "two_seen_unseen", "two_unseen")[num_unseen]
    raise ValueError(f"A sample has one or two objects, not {len(categories)}: {list(categories)}")


def template_fields(template: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(template) if field]


class PromptSet:
    """The prompts a synthesis ``predict`` run generates, grouped as in paper Tab. 1.

    Args:
        counts: samples per split and group, e.g. ``{train: {one_seen: 5000, two_seen: 5000}}``.
            Groups: ``one_seen``, ``two_seen``, ``one_unseen``, ``two_seen_unseen``,
            ``two_unseen``. The ``train`` split may only hold seen groups.
        templates: prompt templates; ``{c1}`` alone makes a one-object template, ``{c1}`` and
            ``{c2}`` a two-object one. A sample draws its template among those of its kind.
        templates_file: a text file of templates, one per line (e.g. complex prompts such as
            "a photograph of a {c1} sleeping on a sofa"); used instead of ``templates``.
        seed: changes every sample (categories, template, initial noise) at once.
    """

    def __init__(
        self,
        counts: Mapping[str, Mapping[str, int]],
        templates: Sequence[str] = (ONE_OBJECT_TEMPLATE, TWO_OBJECT_TEMPLATE),
        templates_file: str | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(counts, Mapping) or not all(isinstance(g, Mapping) for g in counts.values()):
            raise ConfigError(
                f"counts is {counts!r}: give samples per split and group, e.g. {{train: {{one_seen: 100}}}}"
            )
        self.counts = {
            split: check_counts(dict(groups), f"counts.{split}") for split, groups in counts.items()
        }
        if not self.counts:
            raise ConfigError(
                "counts is empty: give samples per split and group, e.g. {train: {one_seen: 100}}"
            )
        self.templates_file, self.seed = templates_file, seed
        self.templates = list(templates)
        for split, groups in self.counts.items():
            unknown = set(groups) - set(GROUPS)
            if unknown:
                raise ConfigError(
                    f"Unknown prompt groups {sorted(unknown)} in counts.{split}; groups are {GROUPS}"
                )
            if split == "train" and set(groups) - set(SEEN_GROUPS):
                raise ConfigError(
                    f"counts.train holds {sorted(set(groups) - set(SEEN_GROUPS))}: training sets use seen "
                    f"categories only ({SEEN_GROUPS}). Put unseen groups in a test split."
                )
        self._check_templates(self.templates, "templates")

    def _check_templates(self, templates: Sequence[str], where: str) -> None:
        for template in templates:
            if sorted(template_fields(template)) not in (["c1"], ["c1", "c2"]):
                raise ConfigError(
                    f"Template {template!r} in {where} must contain {{c1}} (one object) or {{c1}} and "
                    "{c2} (two objects), and no other fields"
                )

    def prepare(self) -> None:
        if self.templates_file is not None:
            path = Path(self.templates_file)
            self.templates = [
                line.strip() for line in read_text_file(path, "templates_file").splitlines() if line.strip()
            ]
            if not self.templates:
                raise ConfigError(
                    f"templates_file '{path}' holds no template (one per line, e.g. 'a photograph of a {{c1}}')"
                )
            self._check_templates(self.templates, str(path))

    def check(self, split: CategorySplit) -> None:
        """Every requested group must be possible with this split's categories."""
        for groups in self.counts.values():
            for group, count in groups.items():
                seen, unseen = GROUP_SIZES[group]
                if count and (len(split.seen) < seen or len(split.unseen) < unseen):
                    raise ConfigError(
                        f"Group {group} needs {seen} seen and {unseen} unseen categories; the split has "
                        f"{len(split.seen)} seen and {len(split.unseen)} unseen"
                    )
        for num_objects in {sum(GROUP_SIZES[group]) for g in self.counts.values() for group in g}:
            if not self._templates(num_objects):
                raise ConfigError(f"No {num_objects}-object template among {self.templates}")

    def _templates(self, num_objects: int) -> list[str]:
        return [t for t in self.templates if len(template_fields(t)) == num_objects]

    def sample(self, sample_id: str, split_name: str, group: str, split: CategorySplit) -> dict:
        """The prompt, categories and generation seed of one id."""
        rng = random.Random(sample_seed(f"{self.seed}/{sample_id}"))
        num_seen, num_unseen = GROUP_SIZES[group]
        categories = rng.sample(list(split.seen), num_seen) + rng.sample(list(split.unseen), num_unseen)
        if num_seen and num_unseen:  # either order in the prompt
            categories = rng.sample(categories, len(categories))
        template = rng.choice(self._templates(len(categories)))
        prompt = template.format(**{f"c{i + 1}": c for i, c in enumerate(categories)})
        seed = rng.getrandbits(63)
        return {
            "id": sample_id,
            "split": split_name,
            "group": group,
            "prompt": prompt,
            "categories": categories,
            "seed": seed,
            "source": fingerprint_values(prompt=prompt, categories=categories, seed=seed),
        }

    def changed(self, record: dict, category_split: CategorySplit, trust_stat: bool = True) -> str | None:
        """Why a cached sample's prompt, categories or seed differ from what this config now
        makes of its id (another seed, templates or counts), or None."""
        recorded = record.get("source")
        item = self._by_id().get(record["id"])
        if not isinstance(recorded, dict) or item is None:
            return None
        if self.sample(*item, category_split)["source"] == recorded:
            return None
        return "its prompt, categories or seed changed (seed, templates or vocabulary of data.source)"

    def _by_id(self) -> dict[str, tuple[str, str, str]]:
        if getattr(self, "_index", None) is None:
            self._index = {item[0]: item for item in self.ids()}
        return self._index

    def items(self) -> list[tuple[str, str, str]]:
        return self.ids()

    def ids(self) -> list[tuple[str, str, str]]:
        """(id, split, group) of every requested sample, in a fixed order."""
        return [
            (f"{split}-{group}-{i:06d}", split, group)
            for split, groups in self.counts.items()
            for group, count in groups.items()
            for i in range(count)
        ]

    def dataset(
        self, category_split: CategorySplit, exclude: set[str] = frozenset(), max_per_group: int | None = None
    ) -> PromptSamples:
        return PromptSamples(self, select_items(self.ids(), exclude, max_per_group), category_split)


class PromptSamples(Dataset):
    def __init__(self, prompts: PromptSet, items: list[tuple[str, str, str]], split: CategorySplit) -> None:
        self.prompts, self.items, self.split = prompts, items, split

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.prompts.sample(*self.items[index], self.split)


def prompt_seed(seed: int, index: int) -> int:
    """The initial-noise seed of the ``index``-th given prompt (its sample id ``{index:06d}``)
    under ``seed``: ``predict`` with a PromptList and the Python API draw the same noise."""
    return sample_seed(f"{seed}/{index:06d}")


class PromptList:
    """Prompts given one by one, each with the category names to ground in it (grounded
    generation). Any names: the head is open-vocabulary.

    Args:
        prompts: ``[{prompt: "a photograph of a dog on a sofa", categories: [dog, sofa]}, ...]``.
        file: a text file instead, one sample per line: ``prompt | category, category``.
        seed: changes every sample's initial noise at once (a sample's noise depends on its
            seed and position only).
    """

    split = "images"

    def __init__(self, prompts: Sequence[Mapping] = (), file: str | None = None, seed: int = 0) -> None:
        for number, entry in enumerate(prompts):
            if not {"prompt", "categories"} <= set(entry):
                raise ConfigError(
                    f"prompts[{number}] = {dict(entry)} needs both `prompt` and `categories` (a list of names)"
                )
        self.entries = [{"prompt": p["prompt"], "categories": list(p["categories"])} for p in prompts]
        self.file, self.seed = file, seed
        if file is not None:
            self.entries += read_prompt_file(file)
        if not self.entries:
            raise ConfigError("PromptList needs `prompts` or a `file` of 'prompt | category, category' lines")

    def prepare(self) -> None:
        pass  # read at config time, so that a bad line fails before any work

    @property
    def classes(self) -> list[str]:
        """Every category name, in order of first appearance (their label ids, from 1)."""
        return list(dict.fromkeys(c for e in self.entries for c in e["categories"]))

    def check(self, split: CategorySplit) -> None:
        for number, entry in enumerate(self.entries):
            if not entry["categories"]:
                raise ConfigError(f"Prompt {number} ({entry['prompt']!r}) names no category to ground")

    def sample(self, index: int) -> dict:
        sample_id = f"{index:06d}"
        return {
            "id": sample_id,
            "split": self.split,
            "prompt": self.entries[index]["prompt"],
            "categories": self.entries[index]["categories"],
            "seed": prompt_seed(self.seed, index),
        }

    def dataset(
        self, category_split: CategorySplit, exclude: set[str] = frozenset(), max_per_group: int | None = None
    ) -> Dataset:
        items = select_items([(f"{i:06d}",) for i in range(len(self.entries))], exclude, max_per_group)
        return ListedPrompts(self, [int(sample_id) for (sample_id,) in items])


class ListedPrompts(Dataset):
    def __init__(self, prompts: PromptList, indices: list[int]) -> None:
        self.prompts, self.indices = prompts, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.prompts.sample(self.indices[index])


def read_prompt_file(file: str) -> list[dict]:
    """Lines ``prompt | category, category`` (blank lines and ``#`` comments skipped)."""
    path = Path(file)
    if file == "None" and not path.is_file():
        # jsonargparse (4.53) parses `--data.init_args.prompts.init_args.file null` as the string "None".
        raise ConfigError(
            "Prompt file 'None': to give prompts without a file, set the whole PromptList: --data.init_args.prompts "
            "'{class_path: PromptList, init_args: {file: null, prompts: [{prompt: ..., categories: [...]}]}}'"
        )
    entries = []
    for number, line in enumerate(read_text_file(path, "Prompt file").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        prompt, sep, names = line.partition("|")
        categories = [c.strip() for c in names.split(",") if c.strip()]
        if not sep or not categories:
            raise ConfigError(f"{path}:{number}: expected 'prompt | category, category', got {line!r}")
        entries.append({"prompt": prompt.strip(), "categories": categories})
    return entries
