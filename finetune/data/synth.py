"""Synthetic GUICourse-style data whose answers are only in the screenshot, for smoke tests and the demo.

Each screenshot (web page or phone screen) holds one coloured button in one cell of a 2x2 layout grid (its
colour and place drawn at random). Tasks, in the
GUICourse prompt formats with 0-1000 coordinates:
- GUIEnv text2bbox: a colour in, the `<box>` of that colour's button out;
- GUIEnv bbox2text: a `<box>` in, the colour of the button there out;
- GUIAct web click: "Click the red button." -> `click, <box>(x1,y1),(x2,y2)</box>`;
- GUIAct smartphone tap: "Tap the blue button." -> `tap, <point>(x,y)</point>`.
With --blank the same samples get blank screenshots: the control, which can only learn answer priors.
"""
import json
import os
import random

from PIL import Image, ImageDraw

from .guicourse import ENV_PROMPT

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
GRID = 2
ACT_PROMPT = "<image>\nActions History\n\nYour Task\n{}\nGenerate next actions to do this task."


def render(rng, size, blank):
    """A screenshot with a button of a random colour in a random grid cell; returns (image, colour, cell)."""
    width, height = size
    image = Image.new("RGB", size, (250, 250, 250))
    colour, cell = rng.choice(sorted(COLOURS)), rng.randrange(GRID * GRID)
    if not blank:
        draw = ImageDraw.Draw(image)
        draw.rectangle([0, 0, width, height // 12], fill=(60, 60, 70))  # title bar
        draw.rectangle(cell_box(cell, size), fill=COLOURS[colour])
    return image, colour, cell


def cell_box(cell, size=(1000, 1000)):
    """The button's box in a cell: in pixels of an image of `size`, by default in 0-1000 coordinates."""
    width, height = size
    row, col = divmod(cell, GRID)
    cw, ch = width / GRID, height / GRID
    return (int(col * cw + cw * 0.2), int(row * ch + ch * 0.3), int(col * cw + cw * 0.8), int(row * ch + ch * 0.7))


def cell_point(cell):
    x1, y1, x2, y2 = cell_box(cell)
    return (x1 + x2) // 2, (y1 + y2) // 2


def make_sample(rng, index, image_name, colour, cell, phone):
    box = "<box>({},{}),({},{})</box>".format(*cell_box(cell))
    point = "<point>({},{})</point>".format(*cell_point(cell))
    if phone:
        task = "guiact-smartphone"
        conversation = [ACT_PROMPT.format(f"Tap the {colour} button."), f"actions:\ntap, {point}"]
    else:
        task = rng.choice(["text2bbox", "bbox2text", "guiact-web-single"])
        if task == "text2bbox":
            conversation = [ENV_PROMPT.format(colour), box]
        elif task == "bbox2text":
            conversation = [ENV_PROMPT.format(box), colour]
        else:
            conversation = [ACT_PROMPT.format(f"Click the {colour} button."), f"actions:\nclick, {box}"]
    sample = {"id": f"synth_{index}_{task}", "image": image_name,
              "conversations": [{"role": "user", "content": conversation[0]},
                                {"role": "assistant", "content": conversation[1]}]}
    if task.startswith("guiact"):
        sample["type"] = task.removeprefix("guiact-")
    return sample


def write_synthetic(out_dir, n, seed=0, blank=False, web_size=(448, 252), phone_size=(144, 288)):
    """n samples (a quarter on phone screens) as OUT/data.jsonl + OUT/images/; returns the data file."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rng = random.Random(seed)
    path = os.path.join(out_dir, "data.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            phone = i % 4 == 3
            image, colour, cell = render(rng, phone_size if phone else web_size, blank)
            name = f"images/{i:06d}.png"
            image.save(os.path.join(out_dir, name))
            f.write(json.dumps(make_sample(rng, i, name, colour, cell, phone)) + "\n")
    return path
