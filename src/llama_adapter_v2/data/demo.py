"""The demo data set: drawn shapes with captions that say what is drawn, and small tasks.

Everything is a pure function of ``data.demo`` (seed and sizes): the same bytes on every run
and machine, so ``data.dvc`` stays valid and a fresh clone regenerates exactly what DVC
tracks. Determinism rules: one seeded ``random.Random``, PNG (no timestamps), JSON with sorted
keys, and nothing read from the clock or the environment.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from rich.progress import track

from llama_adapter_v2.config.schema import DataConfig, DemoDataConfig
from llama_adapter_v2.data.shards import split_of

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220),
    "yellow": (240, 210, 30), "purple": (140, 50, 170), "orange": (245, 140, 20),
}
BACKGROUNDS = {"white": (250, 250, 250), "gray": (128, 128, 128), "black": (10, 10, 10)}
SHAPES = ("circle", "square", "triangle")
PLACES = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
          "center": (0.5, 0.5)}
WORDS = ("cat", "dog", "sun", "tree", "red", "blue", "book", "fish", "bird", "moon", "car", "cup",
         "hat", "box", "star", "milk", "rain", "door", "lamp", "ship")
NUMBER_WORDS = {1: "one", 2: "two"}
GROUNDED_ATTRIBUTES = ("colour", "shape", "place", "count", "background")
COLOUR_FACTS = {"the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow",
                "a tomato": "red", "coal": "black", "an orange": "orange", "a lemon": "yellow",
                "a leaf": "green", "milk": "white", "a plum": "purple", "the sea": "blue"}


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    place: str

    def words(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class DrawnImage:
    file_name: str
    background: str
    shapes: tuple[Shape, ...]


@dataclass(frozen=True)
class GroundedQuestion:
    """A question whose answer the drawing fixes: ``answer`` is the value, ``reply`` a sentence."""

    attribute: str
    question: str
    answer: str
    reply: str


def with_articles(text: str) -> str:
    """"a orange" -> "an orange": the captions are read by people too."""
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)


def where(place: str) -> str:
    return "in the center" if place == "center" else f"on the {place}"


# --------------------------------------------------------------------------- images and captions


def plan_image(rng: random.Random, index: int, prefix: str = "demo") -> DrawnImage:
    background = rng.choice(sorted(BACKGROUNDS))
    colours = [c for c in sorted(COLOURS) if c != background]
    if rng.random() < 0.5:
        shapes = (Shape(rng.choice(colours), rng.choice(SHAPES), rng.choice(sorted(PLACES))),)
    else:
        first, second = rng.sample(colours, 2)
        shapes = (Shape(first, rng.choice(SHAPES), "left"), Shape(second, rng.choice(SHAPES), "right"))
    return DrawnImage(f"{prefix}_{index:06d}.png", background, shapes)


def draw(image: DrawnImage, size: int) -> Image.Image:
    canvas = Image.new("RGB", (size, size), BACKGROUNDS[image.background])
    pen = ImageDraw.Draw(canvas)
    radius = size * 0.2
    for shape in image.shapes:
        cx, cy = (PLACES[shape.place][0] * size, PLACES[shape.place][1] * size)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        fill = COLOURS[shape.colour]
        if shape.kind == "circle":
            pen.ellipse(box, fill=fill)
        elif shape.kind == "square":
            pen.rectangle(box, fill=fill)
        else:
            corners = [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)]
            pen.polygon(corners, fill=fill)
    return canvas


def captions_for(image: DrawnImage, count: int) -> list[str]:
    """``count`` different true sentences about the image (COCO has five per image)."""
    bg = image.background
    if len(image.shapes) == 1:
        s = image.shapes[0]
        options = [
            f"A {s.words()} {where(s.place)} of a {bg} background.",
            f"There is a {s.words()} {where(s.place)}.",
            f"A {bg} picture with a {s.words()}.",
            f"The image shows one {s.words()}.",
            f"A single {s.kind} in {s.colour} {where(s.place)}.",
            f"One {s.colour} shape, a {s.kind}, on {bg}.",
        ]
    else:
        a, b = image.shapes
        options = [
            f"A {a.words()} on the left and a {b.words()} on the right.",
            f"Two shapes on a {bg} background: a {a.words()} and a {b.words()}.",
            f"A {b.words()} on the right of a {a.words()}.",
            f"The image shows a {a.kind} and a {b.kind} side by side.",
            f"A {a.colour} {a.kind} next to a {b.colour} {b.kind} on {bg}.",
            f"Left: a {a.words()}. Right: a {b.words()}.",
        ]
    return [with_articles(options[i % len(options)]) for i in range(count)]


def coco_document(images: list[DrawnImage], cfg: DemoDataConfig) -> dict[str, Any]:
    annotations = []
    for image_id, image in enumerate(images, start=1):
        for caption in captions_for(image, cfg.captions_per_image):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})
    return {
        "info": {"description": f"lav2 demo captions (seed {cfg.seed})", "version": "1"},
        "licenses": [],
        "images": [
            {"id": i, "file_name": im.file_name, "width": cfg.image_size, "height": cfg.image_size}
            for i, im in enumerate(images, start=1)
        ],
        "annotations": annotations,
    }


# --------------------------------------------------------------------------- instructions


def _scene_question(rng: random.Random) -> dict[str, str]:
    """A described scene and a question it answers: reading comprehension, text only.

    A pretrained LLM answers questions about what its context says by finding and copying the
    words; the demo base learns that from these (its corpus is the training text), and it is
    the skill the adapter's visual prompts lean on: they say what the picture holds.
    """
    scene = plan_image(rng, 0)
    question = rng.choice(grounded_questions(rng, scene))
    return {"instruction": question.question, "input": rng.choice(captions_for(scene, 6)),
            "output": question.reply}


def _task(rng: random.Random) -> dict[str, str]:
    kind = rng.randrange(8)
    if kind >= 6:
        return _scene_question(rng)
    a, b = rng.randrange(10), rng.randrange(10)
    words = rng.sample(WORDS, rng.randint(2, 4))
    if kind == 0:
        return {"instruction": f"What is {a} plus {b}?", "input": "", "output": str(a + b)}
    if kind == 1:
        big, small = max(a, b), min(a, b)
        return {"instruction": "Subtract the second number from the first.", "input": f"{big} and {small}",
                "output": str(big - small)}
    if kind == 2:
        return {"instruction": "Reverse the order of the words.", "input": " ".join(words),
                "output": " ".join(reversed(words))}
    if kind == 3:
        return {"instruction": "Repeat the words exactly.", "input": " ".join(words),
                "output": " ".join(words)}
    if kind == 4:
        thing = rng.choice(sorted(COLOUR_FACTS))
        placeholder = rng.choice(["", "", "No input", "<noinput>"])
        return {"instruction": f"What colour is {thing}?", "input": placeholder,
                "output": f"{thing.capitalize()} is {COLOUR_FACTS[thing]}."}
    return {"instruction": "How many words are in the input?", "input": " ".join(words),
            "output": str(len(words))}


def alpaca_tasks(rng: random.Random, count: int) -> list[dict[str, str]]:
    """``count`` distinct tasks (no exact duplicates: validation would quarantine them)."""
    seen: set[tuple[str, str, str]] = set()
    tasks = []
    while len(tasks) < count:
        task = _task(rng)
        key = (task["instruction"], task["input"], task["output"])
        if key not in seen:
            seen.add(key)
            tasks.append(task)
    return tasks


# --------------------------------------------------------------------------- grounded questions


def number_word(count: int) -> str:
    return NUMBER_WORDS[count]


def _subject(image: DrawnImage, shape: Shape) -> str:
    """How a question names one shape: "the shape" alone, else by its side."""
    return "the shape" if len(image.shapes) == 1 else f"the shape {where(shape.place)}"


def grounded_questions(rng: random.Random, image: DrawnImage) -> list[GroundedQuestion]:
    """One question per attribute whose answer the drawing fixes, with its answer as a sentence.

    With two shapes the colour and shape questions name a side, and the place question names
    the shape by colour and kind, so every question has exactly one right answer.
    """
    shape = rng.choice(image.shapes)
    subject = _subject(image, shape)
    count = len(image.shapes)
    place_question = (
        "Where is the shape?" if count == 1 else with_articles(f"Where is the {shape.words()}?")
    )
    shape_question = "What shape is it?" if count == 1 else f"What shape is {where(shape.place)}?"
    return [
        GroundedQuestion("colour", f"What colour is {subject}?", shape.colour, f"It is {shape.colour}."),
        GroundedQuestion("shape", shape_question, shape.kind, with_articles(f"It is a {shape.kind}.")),
        GroundedQuestion("place", place_question, shape.place, f"{where(shape.place).capitalize()}."),
        GroundedQuestion(
            "count", "How many shapes are there?", str(count),
            f"There {'is' if count == 1 else 'are'} {number_word(count)} shape{'s' if count > 1 else ''}.",
        ),
        GroundedQuestion("background", "What colour is the background?", image.background,
                         f"It is {image.background}."),
    ]


def _what_is_drawn(image: DrawnImage) -> tuple[str, str]:
    answer = " and ".join(f"a {s.words()}" for s in image.shapes)
    return "What is drawn here?", with_articles(answer[0].upper() + answer[1:] + ".")


def _image_conversation(rng: random.Random, image: DrawnImage) -> list[dict[str, str]]:
    """One to three questions about the image (more would pass the demo's token limit); a single
    question is read as an instruction (Alpaca template), several as a chat."""
    exchanges = [(q.question, q.reply) for q in grounded_questions(rng, image)]
    exchanges.append(_what_is_drawn(image))
    rng.shuffle(exchanges)
    exchanges = exchanges[: rng.choice((1, 1, 2, 3))]
    turns: list[tuple[str, str]] = []
    for position, (question, reply) in enumerate(exchanges):
        asked = question
        if position == 0:
            asked = f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"
        turns += [("human", asked), ("gpt", reply)]
    return [{"from": who, "value": text} for who, text in turns]


def _text_conversation(rng: random.Random) -> list[dict[str, str]]:
    a, b, c = rng.randrange(10), rng.randrange(10), rng.randrange(10)
    turns = [("human", f"What is {a} plus {b}?"), ("gpt", str(a + b)),
             ("human", f"And if you add {c} more?"), ("gpt", str(a + b + c))]
    if rng.random() < 0.5:
        thing = rng.choice(sorted(COLOUR_FACTS))
        turns += [("human", f"What colour is {thing}?"),
                  ("gpt", f"{thing.capitalize()} is {COLOUR_FACTS[thing]}.")]
    return [{"from": who, "value": text} for who, text in turns]


def conversations(rng: random.Random, images: list[DrawnImage], count: int) -> list[dict[str, Any]]:
    """LLaVA-format chats: even ones about a drawn image of ``images``, odd ones text only; all distinct.

    ``images`` are the training split's: no held-out image is ever talked about in training.
    """
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(items) < count:
        if len(items) % 2 == 0:
            image = rng.choice(images)
            item: dict[str, Any] = {"id": f"chat-{len(items):05d}", "image": image.file_name,
                                    "conversations": _image_conversation(rng, image)}
        else:
            item = {"id": f"chat-{len(items):05d}", "conversations": _text_conversation(rng)}
        texts = [turn["value"].replace("<image>", "").strip() for turn in item["conversations"]]
        key = json.dumps([item.get("image"), texts])  # where <image> sits does not make a new chat
        if key not in seen:
            seen.add(key)
            items.append(item)
    return items


def description(image: DrawnImage) -> str:
    """True captions of the drawing that together name every shape's colour, kind and side and the
    background: the scene in words, for the grounded questions' text control."""
    options = captions_for(image, 2)
    return options[0] if len(image.shapes) == 1 else " ".join(options)


def probe_questions(rng: random.Random, images: list[DrawnImage]) -> list[dict[str, str]]:
    """The grounded evaluation set: every attribute question about every probe drawing."""
    rows = []
    for image in images:
        for question in grounded_questions(rng, image):
            rows.append({"id": f"{Path(image.file_name).stem}:{question.attribute}", "image": image.file_name,
                         "attribute": question.attribute, "question": question.question,
                         "answer": question.answer, "description": description(image)})
    return rows


# One reading task in four restates the scene as a caption, three ask about it. Measured on the
# demo (6,000 texts): one in two left the base reading colours from text at 0.35 and the demo's
# captions naming the drawn colour at 0.44; one in four, 0.71 and 0.74-0.75 (two seeds).
RESTATE_EVERY = 4


def reading_tasks(seed: int, count: int) -> list[dict[str, str]]:
    """Text-only scenes for the demo base to read: a scene in words, then a question about it or
    (one in ``RESTATE_EVERY``) a caption that restates it, as Alpaca-style tasks.

    A pretrained LLM has read a great deal of text that says back what its context holds, and
    that is what lets prompts steer it. The demo base learns it from these; without them, free
    visual prompts fitted to 16 captions leave the colour word at chance (README "What the demo
    model sees"). Scenes are drawn from their own seed: none is a drawing.
    """
    rng = random.Random(f"reading-{seed}")
    tasks = []
    for index in range(count):
        scene = plan_image(rng, index, prefix="reading")
        question = rng.choice(grounded_questions(rng, scene))
        if index % RESTATE_EVERY == RESTATE_EVERY - 1:
            instruction, output = "Describe the picture.", rng.choice(captions_for(scene, 6))
        else:
            instruction, output = question.question, question.reply
        tasks.append({"instruction": instruction, "input": description(scene), "output": output})
    return tasks


# --------------------------------------------------------------------------- writing


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def demo_paths(data: DataConfig) -> tuple[Path, Path, Path, Path]:
    """(caption JSON, image folder, Alpaca JSON, LLaVA JSON) as the config names them."""
    if not data.captions:
        raise ValueError("data.captions names no COCO source to write the demo captions to")
    by_format = {source.format: source.path for source in data.instructions}
    missing = {"alpaca", "llava"} - set(by_format)
    if missing:
        raise ValueError(f"data.instructions needs a source of format {sorted(missing)} for the demo")
    return data.captions[0].annotations, data.captions[0].images, by_format["alpaca"], by_format["llava"]


def draw_all(images: list[DrawnImage], folder: Path, size: int, description: str) -> None:
    if folder.exists():
        shutil.rmtree(folder)  # generated content only: stale images must not linger
    folder.mkdir(parents=True)
    for image in track(images, description=description, transient=True):
        draw(image, size).save(folder / image.file_name, format="PNG", compress_level=6)


def generate_demo(data: DataConfig) -> dict[str, int]:
    """Write the demo data set where ``data`` says; returns the counts written.

    Image conversations are about training-split images only (the split is the shards' own
    rule), and the grounded questions (``data.grounded``) are about probe drawings that no
    training source holds: held-out images in the strict sense.
    """
    cfg = data.demo or DemoDataConfig()
    annotations_path, image_dir, alpaca_path, chat_path = demo_paths(data)
    rng = random.Random(cfg.seed)
    images = [plan_image(rng, i) for i in range(cfg.n_images)]
    draw_all(images, image_dir, cfg.image_size, "drawing demo images")
    coco = coco_document(images, cfg)
    write_json(annotations_path, coco)
    write_json(alpaca_path, alpaca_tasks(rng, cfg.n_instructions))
    training_images = [im for im in images if split_of(im.file_name, data.holdout_fraction) == "train"]
    write_json(chat_path, conversations(rng, training_images, cfg.n_conversations))
    counts = {"images": len(images), "captions": len(coco["annotations"]),
              "instructions": cfg.n_instructions, "conversations": cfg.n_conversations}
    if data.grounded is not None:
        probe_rng = random.Random(f"probe-{cfg.seed}")
        probes = [plan_image(probe_rng, i, prefix="probe") for i in range(cfg.n_probe_images)]
        draw_all(probes, data.grounded.images, cfg.image_size, "drawing probe images")
        questions = probe_questions(probe_rng, probes)
        write_json(data.grounded.questions, questions)
        counts |= {"probe images": len(probes), "grounded questions": len(questions)}
    return counts
