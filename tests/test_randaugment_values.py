"""RandAugment's ops (``fusionkd.data.mixing.apply_op``) on small hand-made uint8 images against results computed
by hand: the colour ops' formulas, posterize's bits, solarize's threshold (its full magnitude is invert), and
the geometric ops' exact pixel mappings (nearest neighbour, zero fill). Then ``randaugment`` applying each image's
drawn ops in order, with their signs."""

from __future__ import annotations

import math

import pytest
import torch

from fusionkd.data.mixing import MAX_MAGNITUDE, RANDAUGMENT_OPS, RandAugmentDraws, apply_op, randaugment


def img(rows: list[list[float]] | list[list[list[float]]]) -> torch.Tensor:
    """One image (1, C, H, W) from rows (grey) or channels of rows."""
    t = torch.tensor(rows, dtype=torch.float32)
    return (t.unsqueeze(0) if t.ndim == 2 else t).unsqueeze(0)


def op(name: str, x: torch.Tensor, level: float) -> torch.Tensor:
    return apply_op(name, x.clone(), torch.full((x.shape[0],), level))


def close(a: torch.Tensor, b) -> None:
    b = b if isinstance(b, torch.Tensor) else torch.tensor(b, dtype=torch.float32)
    assert torch.allclose(a, b.view_as(a), atol=1e-3), (a, b)


GREY = img([[0, 15, 16, 100], [127, 128, 200, 255]])  # 2 x 4


# ------------------------------------------------------------------------------ pixel-value ops
def test_solarize_threshold_and_full_magnitude_is_invert():
    # threshold 255 (1 - |level|); pixels strictly above it become 255 - x
    close(op("solarize", GREY, 0.5), [[0, 15, 16, 100], [127, 127, 55, 0]])  # threshold 127.5
    close(op("solarize", GREY, -0.5), [[0, 15, 16, 100], [127, 127, 55, 0]])  # the sign does not matter
    close(op("solarize", GREY, 1.0), [[0, 240, 239, 155], [128, 127, 55, 0]])  # threshold 0: 255 - x (0 stays)
    close(op("solarize", GREY, 0.0), GREY)  # threshold 255: nothing


def test_posterize_keeps_the_high_bits():
    # bits = 8 - round(4 |level|), at least 4: keep them, zero the others (floor to a multiple of 2^(8 - bits))
    close(op("posterize", GREY, 1.0), [[0, 0, 16, 96], [112, 128, 192, 240]])  # 4 bits: multiples of 16
    close(op("posterize", GREY, -0.5), [[0, 12, 16, 100], [124, 128, 200, 252]])  # 6 bits: multiples of 4
    close(op("posterize", GREY, 0.3), [[0, 14, 16, 100], [126, 128, 200, 254]])  # round(1.2) = 1: 7 bits
    close(op("posterize", GREY, 0.1), GREY)  # round(0.4) = 0: 8 bits, unchanged


def test_brightness_scales_towards_black():
    # blend with a black image: factor 1 + 0.9 level, clamped to [0, 255]
    close(op("brightness", GREY, 0.5), [[0, 21.75, 23.2, 145], [184.15, 185.6, 255, 255]])  # x 1.45
    close(op("brightness", GREY, -1.0), [[0, 1.5, 1.6, 10], [12.7, 12.8, 20, 25.5]])  # x 0.1


def test_contrast_blends_with_the_mean_grey():
    x = img([[10, 20], [30, 60]])  # mean 30
    close(op("contrast", x, 1.0), [[0, 11, 30, 87]])  # 30 + 1.9 (x - 30), clamped at 0
    close(op("contrast", x, -1.0), [[28, 29, 30, 33]])  # 30 + 0.1 (x - 30)


def test_color_blends_with_the_luma_grey():
    x = img([[[200.0]], [[100.0]], [[50.0]]])  # one RGB pixel; grey = .299 R + .587 G + .114 B = 124.2
    close(op("color", x, 0.5), [124.2 + 1.45 * 75.8, 124.2 - 1.45 * 24.2, 124.2 - 1.45 * 74.2])
    close(op("color", x, -1.0), [124.2 + 0.1 * 75.8, 124.2 - 0.1 * 24.2, 124.2 - 0.1 * 74.2])
    close(op("color", GREY, 1.0), GREY)  # a grey image has no colour to change


def test_sharpness_against_the_smoothing_kernel():
    # blurred = [[1,1,1],[1,5,1],[1,1,1]] / 13 (replicated border): 90/13 around a single 90 pixel, 450/13 on it
    x = img([[0, 0, 0], [0, 90, 0], [0, 0, 0]])
    edge, centre = 90 / 13, 450 / 13
    close(op("sharpness", x, 1.0), [[0, 0, 0], [0, centre + 1.9 * (90 - centre), 0], [0, 0, 0]])  # edge < 0: 0
    soft = edge - 0.1 * edge
    close(op("sharpness", x, -1.0), [[soft, soft, soft], [soft, centre + 0.1 * (90 - centre), soft],
                                     [soft, soft, soft]])


def test_autocontrast_stretches_each_channel():
    x = img([[[50, 100], [150, 100]], [[7, 7], [7, 7]]])
    close(op("autocontrast", x, 0.7), [[[0, 127.5], [255, 127.5]], [[7, 7], [7, 7]]])  # a flat channel stays


# ------------------------------------------------------------------------------ geometric ops
RAMP = img([[10 * i + j + 1 for j in range(8)] for i in range(8)])  # 8 x 8, every pixel different, none 0


def shifted(rows_offsets: list[int], axis: str) -> torch.Tensor:
    """out[i, j] = RAMP[i, j + d_i] (axis x) or RAMP[i + d_j, j] (axis y), 0 outside."""
    src = RAMP[0, 0]
    out = torch.zeros_like(src)
    for i in range(8):
        for j in range(8):
            si, sj = (i, j + rows_offsets[i]) if axis == "x" else (i + rows_offsets[j], j)
            if 0 <= si < 8 and 0 <= sj < 8:
                out[i, j] = src[si, sj]
    return out.view(1, 1, 8, 8)


def test_translate_by_whole_pixels():
    level = 2 * 331 / (150 * 8)  # 150/331 of the width per unit level: exactly 2 of 8 pixels
    assert torch.equal(op("translate_x", RAMP, level), shifted([2] * 8, "x"))  # content moves left, 0 fill
    assert torch.equal(op("translate_x", RAMP, -level), shifted([-2] * 8, "x"))
    assert torch.equal(op("translate_y", RAMP, level), shifted([2] * 8, "y"))
    assert torch.equal(op("translate_x", RAMP, 0.0), RAMP)


def test_shear_moves_each_row_by_its_rounded_offset():
    # x_src = x + 0.3 level y (normalised): rows i = 0..7 of an 8-pixel image move by 0.15 (2i - 7) pixels at
    # level 1, i.e. -1.05 .. 1.05, rounded to the nearest pixel
    assert torch.equal(op("shear_x", RAMP, 1.0), shifted([-1, -1, 0, 0, 0, 0, 1, 1], "x"))
    assert torch.equal(op("shear_x", RAMP, -1.0), shifted([1, 1, 0, 0, 0, 0, -1, -1], "x"))
    assert torch.equal(op("shear_y", RAMP, 1.0), shifted([-1, -1, 0, 0, 0, 0, 1, 1], "y"))


@pytest.mark.parametrize("level", [1.0, -1.0, 0.5])
def test_rotate_is_the_nearest_neighbour_index_mapping(level):
    """Output pixel (i, j) takes the source pixel nearest to R(30 level deg) applied to its centre (normalised
    coordinates, y down), 0 when that falls outside."""
    a = math.radians(30 * level)
    src = RAMP[0, 0]
    want = torch.zeros_like(src)
    for i in range(8):
        for j in range(8):
            xn, yn = (2 * j + 1) / 8 - 1, (2 * i + 1) / 8 - 1
            xs, ys = math.cos(a) * xn - math.sin(a) * yn, math.sin(a) * xn + math.cos(a) * yn
            fx, fy = ((xs + 1) * 8 - 1) / 2, ((ys + 1) * 8 - 1) / 2
            assert min(abs(fx % 1 - 0.5), abs(fy % 1 - 0.5)) > 1e-3  # no tie: the rounding is unambiguous
            sx, sy = round(fx), round(fy)
            if 0 <= sx < 8 and 0 <= sy < 8:
                want[i, j] = src[sy, sx]
    got = op("rotate", RAMP, level)
    assert torch.equal(got, want.view(1, 1, 8, 8))
    assert 0 < int((got == 0).sum()) < 64  # corners left empty, the middle kept


def test_rotate_keeps_the_centre_and_turns_the_corners_out():
    # a 30 degree turn of an 8 x 8 image: the 4 centre pixels map to the centre 2 x 2 block, each corner pixel's
    # source lies outside the image
    got = op("rotate", RAMP, 1.0)[0, 0]
    assert set(got[3:5, 3:5].flatten().tolist()) <= set(RAMP[0, 0, 3:5, 3:5].flatten().tolist())
    assert got[0, 0] == got[0, 7] == got[7, 0] == got[7, 7] == 0


# ------------------------------------------------------------------------------ the batch op
def test_randaugment_applies_each_images_ops_in_order_with_their_signs():
    k = {name: i for i, name in enumerate(RANDAUGMENT_OPS)}
    x = torch.cat([GREY, GREY, GREY]).to(torch.uint8)  # three images, three different op sequences
    draws = RandAugmentDraws(
        ops=torch.tensor([[k["solarize"], k["posterize"]],
                          [k["posterize"], k["solarize"]],
                          [k["identity"], k["brightness"]]]),
        signs=torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, -1.0]]))
    out = randaugment(x, draws, magnitude=MAX_MAGNITUDE // 2)  # level 0.5
    assert out.dtype == torch.float32
    close(out[0:1], op("posterize", op("solarize", GREY, 0.5), 0.5))  # solarize first, then posterize
    close(out[1:2], op("solarize", op("posterize", GREY, 0.5), 0.5))
    close(out[2:3], op("brightness", GREY, -0.5))  # the sign: darker, x 0.55
    close(out[2:3], [[0, 8.25, 8.8, 55], [69.85, 70.4, 110, 140.25]])
    assert not torch.allclose(out[0], out[1])  # the order matters here
