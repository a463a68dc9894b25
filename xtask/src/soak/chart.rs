//! The soak's chart: RSS and open fds over time as a PNG, drawn and encoded here.
//!
//! A chart crate would do it, but plotters' text needs a system font (or `font-kit`) and its
//! PNG encoder pulls in `image`; two line panels need neither. Text is a 5x7 bitmap font
//! (upper case, digits, a little punctuation), the PNG is RGB, filter 0, deflated by
//! `miniz_oxide`.
use std::path::Path;

use anyhow::Context as _;

pub type Rgb = [u8; 3];
pub const BLACK: Rgb = [0, 0, 0];
pub const GRID: Rgb = [225, 225, 225];
pub const BLUE: Rgb = [31, 119, 180];
pub const ORANGE: Rgb = [230, 120, 20];
pub const RED: Rgb = [200, 40, 40];
pub const GREEN: Rgb = [40, 150, 60];
pub const GREY: Rgb = [150, 150, 150];

/// An RGB image.
pub struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    pub fn new(width: usize, height: usize) -> Self {
        Canvas {
            width,
            height,
            pixels: [255].repeat(width * height * 3),
        }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x < 0 || y < 0 || x as usize >= self.width || y as usize >= self.height {
            return;
        }
        let i = (y as usize * self.width + x as usize) * 3;
        self.pixels[i..i + 3].copy_from_slice(&c);
    }

    pub fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb) {
        for y in y0.min(y1)..=y0.max(y1) {
            for x in x0.min(x1)..=x0.max(x1) {
                self.set(x, y, c);
            }
        }
    }

    /// A line `width` pixels thick (Bresenham, widened with squares).
    pub fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb, width: i64) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        let half = width / 2;
        loop {
            self.rect(
                x - half,
                y - half,
                x - half + width - 1,
                y - half + width - 1,
                c,
            );
            if x == x1 && y == y1 {
                return;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// A dashed horizontal line.
    pub fn dashed(&mut self, x0: i64, x1: i64, y: i64, c: Rgb) {
        for x in x0..=x1 {
            if (x - x0) % 10 < 6 {
                self.set(x, y, c);
            }
        }
    }

    /// Text at scale `s` with its top left corner at (x, y); lower case is drawn as upper case.
    pub fn text(&mut self, x: i64, y: i64, text: &str, c: Rgb, s: i64) {
        for (i, ch) in text.chars().enumerate() {
            let rows = glyph(ch.to_ascii_uppercase());
            let gx = x + i as i64 * 6 * s;
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0b10000 >> col) != 0 {
                        let (px, py) = (gx + col * s, y + r as i64 * s);
                        self.rect(px, py, px + s - 1, py + s - 1, c);
                    }
                }
            }
        }
    }

    /// Width in pixels of `text` at scale `s`.
    pub fn text_width(text: &str, s: i64) -> i64 {
        text.chars().count() as i64 * 6 * s
    }

    pub fn save_png(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, self.png()).with_context(|| format!("writing {}", path.display()))
    }

    fn png(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity((self.width * 3 + 1) * self.height);
        for row in self.pixels.chunks(self.width * 3) {
            raw.push(0); // filter: none
            raw.extend_from_slice(row);
        }
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&(self.width as u32).to_be_bytes());
        ihdr.extend_from_slice(&(self.height as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8 bits, RGB, deflate, filter 0, no interlace
        chunk(&mut out, b"IHDR", &ihdr);
        chunk(
            &mut out,
            b"IDAT",
            &miniz_oxide::deflate::compress_to_vec_zlib(&raw, 6),
        );
        chunk(&mut out, b"IEND", &[]);
        out
    }
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// CRC-32 (IEEE), as PNG chunks need.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Rows of a 5x7 glyph, the top row first, the leftmost pixel in bit 4.
fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [0x0e, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0e],
        '1' => [0x04, 0x0c, 0x04, 0x04, 0x04, 0x04, 0x0e],
        '2' => [0x0e, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1f],
        '3' => [0x1f, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0e],
        '4' => [0x02, 0x06, 0x0a, 0x12, 0x1f, 0x02, 0x02],
        '5' => [0x1f, 0x10, 0x1e, 0x01, 0x01, 0x11, 0x0e],
        '6' => [0x06, 0x08, 0x10, 0x1e, 0x11, 0x11, 0x0e],
        '7' => [0x1f, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0e, 0x11, 0x11, 0x0e, 0x11, 0x11, 0x0e],
        '9' => [0x0e, 0x11, 0x11, 0x0f, 0x01, 0x02, 0x0c],
        'A' => [0x0e, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11],
        'B' => [0x1e, 0x11, 0x11, 0x1e, 0x11, 0x11, 0x1e],
        'C' => [0x0e, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0e],
        'D' => [0x1c, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1c],
        'E' => [0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x1f],
        'F' => [0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x10],
        'G' => [0x0e, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0f],
        'H' => [0x11, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11],
        'I' => [0x0e, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0e],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0c],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1f],
        'M' => [0x11, 0x1b, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0e, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e],
        'P' => [0x1e, 0x11, 0x11, 0x1e, 0x10, 0x10, 0x10],
        'Q' => [0x0e, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0d],
        'R' => [0x1e, 0x11, 0x11, 0x1e, 0x14, 0x12, 0x11],
        'S' => [0x0f, 0x10, 0x10, 0x0e, 0x01, 0x01, 0x1e],
        'T' => [0x1f, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0a, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0a],
        'X' => [0x11, 0x11, 0x0a, 0x04, 0x0a, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0a, 0x04, 0x04, 0x04],
        'Z' => [0x1f, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1f],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0c, 0x0c],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0c, 0x04, 0x08],
        '-' => [0x00, 0x00, 0x00, 0x1f, 0x00, 0x00, 0x00],
        '+' => [0x00, 0x04, 0x04, 0x1f, 0x04, 0x04, 0x00],
        '=' => [0x00, 0x00, 0x1f, 0x00, 0x1f, 0x00, 0x00],
        ':' => [0x00, 0x0c, 0x0c, 0x00, 0x0c, 0x0c, 0x00],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        _ => [0; 7],
    }
}

/// One panel of a chart: a series of (x, y) points and the lines across it.
pub struct Panel<'a> {
    pub title: &'a str,
    pub points: &'a [(f64, f64)],
    pub color: Rgb,
    /// Horizontal reference lines: (y, colour, label).
    pub levels: Vec<(f64, Rgb, String)>,
}

/// Panels stacked vertically over one time axis (seconds), with vertical marks at `marks`
/// (x, colour) and a legend line at the bottom.
pub fn draw(panels: &[Panel<'_>], marks: &[(f64, Rgb)], legend: &[(Rgb, &str)]) -> Canvas {
    const W: i64 = 1200;
    const PANEL_H: i64 = 300;
    const LEFT: i64 = 90;
    const RIGHT: i64 = 30;
    const TOP: i64 = 40;
    const GAP: i64 = 70;
    let height = TOP + panels.len() as i64 * (PANEL_H + GAP) + 20;
    let mut c = Canvas::new(W as usize, height as usize);
    let last = panels
        .iter()
        .flat_map(|p| p.points.iter().map(|(x, _)| *x))
        .fold(1.0f64, f64::max);
    let x_step = nice_step(last / 10.0);
    let x_ticks = (last / x_step).ceil() as u32;
    let x_max = x_step * f64::from(x_ticks);
    let plot_w = W - LEFT - RIGHT;
    let px = |x: f64| LEFT + ((x / x_max) * plot_w as f64).round() as i64;
    for (i, p) in panels.iter().enumerate() {
        let top = TOP + i as i64 * (PANEL_H + GAP);
        let bottom = top + PANEL_H;
        let highest = p
            .points
            .iter()
            .map(|(_, y)| *y)
            .chain(p.levels.iter().map(|(y, _, _)| *y))
            .fold(1.0f64, f64::max)
            * 1.1;
        let y_step = nice_step(highest / 5.0);
        let y_ticks = (highest / y_step).ceil() as u32;
        let y_max = y_step * f64::from(y_ticks);
        let py = |y: f64| bottom - ((y / y_max) * PANEL_H as f64).round() as i64;
        c.text(LEFT, top - 22, p.title, BLACK, 2);
        for k in 0..=y_ticks {
            let y = y_step * f64::from(k);
            let yy = py(y);
            c.line((LEFT, yy), (W - RIGHT, yy), GRID, 1);
            let label = if y_step >= 1.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.1}")
            };
            c.text(
                LEFT - 8 - Canvas::text_width(&label, 2),
                yy - 7,
                &label,
                BLACK,
                2,
            );
        }
        for k in 0..=x_ticks {
            let x = x_step * f64::from(k);
            let xx = px(x);
            c.line((xx, top), (xx, bottom), GRID, 1);
            let label = format!("{x:.0}");
            c.text(
                xx - Canvas::text_width(&label, 2) / 2,
                bottom + 8,
                &label,
                BLACK,
                2,
            );
        }
        for (x, colour) in marks {
            c.line((px(*x), top), (px(*x), bottom), *colour, 1);
        }
        for (y, colour, label) in &p.levels {
            c.dashed(LEFT, W - RIGHT, py(*y), *colour);
            c.text(
                W - RIGHT - Canvas::text_width(label, 1) - 4,
                py(*y) - 10,
                label,
                *colour,
                1,
            );
        }
        for w in p.points.windows(2) {
            let (a, b) = (w[0], w[1]);
            c.line((px(a.0), py(a.1)), (px(b.0), py(b.1)), p.color, 2);
        }
        c.line((LEFT, top), (LEFT, bottom), BLACK, 1);
        c.line((LEFT, bottom), (W - RIGHT, bottom), BLACK, 1);
    }
    let mut x = LEFT;
    let y = height - 22;
    c.text(x, y, "TIME (S)", BLACK, 2);
    x += Canvas::text_width("TIME (S)", 2) + 30;
    for (colour, label) in legend {
        c.rect(x, y + 4, x + 16, y + 8, *colour);
        c.text(x + 22, y, label, BLACK, 2);
        x += 22 + Canvas::text_width(label, 2) + 30;
    }
    c
}

/// The round step (1, 2 or 5 times a power of ten) nearest above `raw`, for axis ticks.
pub fn nice_step(raw: f64) -> f64 {
    let raw = raw.max(1e-9);
    let power = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_numbers() {
        assert_eq!(nice_step(4.6), 5.0);
        assert_eq!(nice_step(17.0), 20.0);
        assert_eq!(nice_step(0.3), 0.5);
        assert_eq!(nice_step(100.0), 100.0);
    }

    #[test]
    fn crc32_matches_the_png_spec_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        // The IEND chunk's CRC every PNG ends with.
        assert_eq!(crc32(b"IEND"), 0xae42_6082);
    }

    #[test]
    fn png_has_signature_header_and_end() {
        let mut c = Canvas::new(3, 2);
        c.text(0, 0, "A", RED, 1);
        let png = c.png();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR\0\0\0\x03\0\0\0\x02"));
        assert!(png.ends_with(b"IEND\xae\x42\x60\x82"));
    }
}
