"""Image side of MiniCPM-Llama3-V 2.5, shared by `chat()` and training: slicing, pixel strips, placeholders.

Reproduces the official code exactly (sizes, bicubic resizes, crop order, normalisation), written without
torchvision. `slice_plan` is pure size arithmetic, so token counts can be known from image headers alone.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGE_START, IMAGE_END, UNK = "<image>", "</image>", "<unk>"
SLICE_START, SLICE_END = "<slice>", "</slice>"


def _ensure_divide(length, patch_size):
    return max(round(length / patch_size) * patch_size, patch_size)


def _best_resize(size, scale_resolution, patch_size, allow_upscale=False):
    """Aspect-preserving size of area about scale_resolution**2, both sides multiples of patch_size."""
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        ratio = width / height
        height = int(scale_resolution / math.sqrt(ratio))
        width = int(height * ratio)
    return _ensure_divide(width, patch_size), _ensure_divide(height, patch_size)


@dataclass(frozen=True)
class SlicePlan:
    source_size: tuple          # (width, height) of the downscaled whole image
    grid: tuple | None          # (cols, rows), None when the image is not sliced
    refine_size: tuple | None   # (width, height) the image is resized to before it is cut into the grid

    @property
    def n_slices(self):
        return self.grid[0] * self.grid[1] if self.grid else 0

    @property
    def slice_size(self):
        return (self.refine_size[0] // self.grid[0], self.refine_size[1] // self.grid[1]) if self.grid else None

    def tgt_sizes(self, patch_size):
        """[patch rows, patch cols] of the source image, then of each slice."""
        sizes = [self.source_size] + [self.slice_size] * self.n_slices
        return [(h // patch_size, w // patch_size) for w, h in sizes]


def slice_plan(size, max_slice_nums=9, scale_resolution=448, patch_size=14):
    """How the official code slices an image of `size` = (width, height)."""
    width, height = size
    log_ratio = math.log(width / height)
    multiple = min(math.ceil(width * height / (scale_resolution * scale_resolution)), max_slice_nums)
    if multiple <= 1:
        return SlicePlan(_best_resize(size, scale_resolution, patch_size, allow_upscale=True), None, None)

    source_size = _best_resize(size, scale_resolution, patch_size)
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slice_nums]
    grids = [(m, n // m) for n in counts for m in range(1, n + 1) if n % m == 0]
    grid = min(grids, key=lambda g: abs(log_ratio - math.log(g[0] / g[1])))  # first of the minima, as official
    cols, rows = grid
    cell = (_ensure_divide(width, cols) / cols, _ensure_divide(height, rows) / rows)
    cell_w, cell_h = _best_resize(cell, scale_resolution, patch_size, allow_upscale=True)
    return SlicePlan(source_size, grid, (cell_w * cols, cell_h * rows))


def slice_image(image, plan):
    """The source image, then the slices row-major, as PIL images."""
    images = [image.resize(plan.source_size, Image.Resampling.BICUBIC)]
    if plan.grid:
        refined = image.resize(plan.refine_size, Image.Resampling.BICUBIC)
        slice_w, slice_h = plan.slice_size
        for top in range(0, plan.refine_size[1], slice_h):
            for left in range(0, plan.refine_size[0], slice_w):
                images.append(refined.crop((left, top, left + slice_w, top + slice_h)))
    return images


def image_placeholder(plan, query_num):
    """The text that stands for one image: `<image><unk>*q</image>`, then the slice grid if sliced."""
    unit = IMAGE_START + UNK * query_num + IMAGE_END
    text = unit
    if plan.grid:
        cols, rows = plan.grid
        text += SLICE_START + "\n".join(unit * cols for _ in range(rows)) + SLICE_END
    return text


def to_pixel_strip(image, patch_size=14):
    """RGB PIL image -> normalised [3, patch, n_patches * patch] strip (patches row-major, side by side). The patches
    are laid out while the pixels are still bytes: one small copy, then one pass of arithmetic."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    rows, cols = pixels.shape[0] // patch_size, pixels.shape[1] // patch_size
    pixels = pixels[:rows * patch_size, :cols * patch_size].reshape(rows, patch_size, cols, patch_size, 3)
    strip = pixels.permute(4, 1, 0, 2, 3).reshape(3, patch_size, rows * cols * patch_size)  # [c, y, (row, col, x)]
    return (strip.float().div(255) - 0.5) / 0.5


def pack_pixel_strips(strips, dtype=None):
    """Right-zero-pad [3, P, L*P] strips to the longest and stack: [N, 3, P, Lmax*P], in `dtype` (default: theirs)."""
    longest = max(s.shape[-1] for s in strips)
    packed = strips[0].new_zeros(len(strips), *strips[0].shape[:-1], longest, dtype=dtype)
    for row, strip in zip(packed, strips):
        row[..., :strip.shape[-1]] = strip
    return packed


@dataclass
class ProcessedImage:
    pixel_values: list   # [3, patch, L * patch] per unit (source, then slices)
    tgt_sizes: torch.Tensor  # [units, 2] int32 patch rows, cols
    placeholder: str


def process_image(image, query_num, max_slice_nums=9, scale_resolution=448, patch_size=14):
    """One RGB PIL image -> the strips, target sizes and placeholder text the model expects."""
    plan = slice_plan(image.size, max_slice_nums, scale_resolution, patch_size)
    strips = [to_pixel_strip(unit, patch_size) for unit in slice_image(image, plan)]
    tgt_sizes = torch.tensor(plan.tgt_sizes(patch_size), dtype=torch.int32)
    return ProcessedImage(strips, tgt_sizes, image_placeholder(plan, query_num))


def image_bounds(input_ids, im_start_id, im_end_id):
    """[n, 2] (start, end) of the `<unk>` run inside each `<image>`...`</image>` of a 1-D id tensor."""
    starts = torch.where(input_ids == im_start_id)[0] + 1
    ends = torch.where(input_ids == im_end_id)[0]
    if len(starts) != len(ends):
        raise ValueError(f"{len(starts)} <image> tokens but {len(ends)} </image> tokens")
    return torch.stack([starts, ends], dim=1) if len(starts) else torch.zeros(0, 2, dtype=torch.long)
