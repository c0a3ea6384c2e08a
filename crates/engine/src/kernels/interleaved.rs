//! Weight rows interleaved eight at a time (like llama.cpp's repacked `block_q4_0x8`, in a layout of our own):
//! a step costs one conversion, one scale multiply and one FMA (two of each for Q6_K's halves, and one more FMA
//! for an offset) per unit of 32 columns and activation row for eight weight rows instead of as many per weight
//! row, and no horizontal sums.
//!
//! A **tile** holds block `b` of eight consecutive weight rows, in exactly the bytes those eight blocks took: a
//! head with their scales side by side, then each unit of 32 columns, its weights in **groups** of four
//! columns, one 32-byte register per group with row `r`'s four weights at bytes `4r..4r + 4`. A byte dot
//! product of a group with an activation row's four values broadcast to every lane gives each of the eight rows
//! its share in its own 32-bit lane, so a unit's eight groups add up in eight integer lanes, exactly.
//!
//! - **Heads**: eight f16 `d`; then Q4_1's eight `m`; Q4_K's and Q5_K's eight `dmin` and each unit's scales
//!   and minimums (12 bytes: row `r`'s 6-bit scale and the minimum's low two bits in byte `r`, the minimums'
//!   high nibbles in a little-endian u32); Q6_K's sixteen sub-block scales, eight rows each.
//! - **Units**: nibbles in four 32-byte chunks, chunk `c`'s low nibbles group `c`, its high nibbles group
//!   `c + 4`; Q5_0's and Q5_K's fifth bits first, a little-endian u32 per group (bit `4r + p` for row `r`,
//!   column `p`); Q6_K's two high bits after the nibbles, in two chunks (chunk `h`, bits `2k..2k + 2`: group
//!   `h + 2k`); Q8_0's eight groups of signed bytes.
//!
//! Signed formats are read as unsigned bytes `w + c` (Q8_0 with its sign bit flipped) with each unit's integer
//! sum (Q6_K: each half's) started at `-c · Σq` of the activations, so the sums are exact and every instruction
//! set gives the same bits as the portable path (AVX2 takes the sign trick for Q8_0, whose biased bytes would
//! saturate its 16-bit pairs).

use rayon::prelude::*;

use super::blocks::{QK_K, Unit, scale_min_k4};
use super::{Format, QK, Rows, f16_at};

/// Weight rows a tile interleaves.
pub const ROWS: usize = 8;

/// Bytes of a tile: eight rows' blocks.
pub fn tile_bytes(format: Format) -> usize {
    ROWS * format.block_bytes()
}

/// Bytes of a tile's head (its scales), before its units.
pub fn head_bytes(format: Format) -> usize {
    match format {
        Format::Q4K | Format::Q5K => 4 * ROWS + 12 * (QK_K / QK),
        Format::Q4_1 => 4 * ROWS,
        Format::Q6K => 2 * ROWS + 16 * ROWS,
        Format::Q4_0 | Format::Q5_0 | Format::Q8_0 => 2 * ROWS,
    }
}

/// Bytes of one unit (32 columns of the eight rows) in a tile.
pub fn unit_bytes(format: Format) -> usize {
    match format {
        Format::Q4_0 | Format::Q4_1 | Format::Q4K => 128,
        Format::Q5_0 | Format::Q5K => 32 + 128,
        Format::Q6K => 128 + 64,
        Format::Q8_0 => 256,
    }
}

/// Bytes of a group of eight rows of `cols` columns: its tiles.
pub fn group_bytes(format: Format, cols: usize) -> usize {
    cols / format.block_elems() * tile_bytes(format)
}

/// Rewrites `bytes`, rows of `format` blocks (`rows` a multiple of [`ROWS`]), as tiles, in place: each group of
/// eight rows becomes its tiles in the same bytes, so the matrix takes no more memory, then or after (groups
/// on every thread: a model's load spends its time here).
pub fn interleave(format: Format, bytes: &mut [u8], cols: usize) {
    let (row_bytes, bb, tb) = (format.row_bytes(cols), format.block_bytes(), tile_bytes(format));
    let (blocks, per_block) = (cols / format.block_elems(), format.block_elems() / QK);
    assert!(bytes.len().is_multiple_of(ROWS * row_bytes), "rows are not a multiple of {ROWS}");
    let groups = bytes.par_chunks_exact_mut(ROWS * row_bytes);
    groups.for_each_init(
        || vec![0u8; ROWS * row_bytes],
        |group, dst| {
            group.copy_from_slice(dst);
            for b in 0..blocks {
                let tile = &mut dst[b * tb..][..tb];
                let row = |r: usize| &group[r * row_bytes..][..row_bytes];
                let block = |r: usize| &row(r)[b * bb..][..bb];
                // The head: scales as the rows' blocks have them, eight rows side by side.
                tile[..head_bytes(format)].fill(0);
                for r in 0..ROWS {
                    match format {
                        Format::Q4K | Format::Q5K => {
                            tile[2 * r..2 * r + 2].copy_from_slice(&block(r)[0..2]);
                            tile[16 + 2 * r..16 + 2 * r + 2].copy_from_slice(&block(r)[2..4]);
                            for j in 0..8 {
                                let (sc, m) = scale_min_k4(j, &block(r)[4..16]);
                                let at = 32 + 12 * j;
                                tile[at + r] = sc | ((m & 3) << 6);
                                tile[at + 8 + r / 2] |= (m >> 2) << (4 * (r % 2));
                            }
                        }
                        Format::Q4_1 => {
                            tile[2 * r..2 * r + 2].copy_from_slice(&block(r)[0..2]);
                            tile[16 + 2 * r..16 + 2 * r + 2].copy_from_slice(&block(r)[2..4]);
                        }
                        Format::Q6K => {
                            tile[2 * r..2 * r + 2].copy_from_slice(&block(r)[208..210]);
                            for s in 0..16 {
                                tile[16 + 8 * s + r] = block(r)[192 + s];
                            }
                        }
                        Format::Q4_0 | Format::Q5_0 | Format::Q8_0 => {
                            tile[2 * r..2 * r + 2].copy_from_slice(&block(r)[0..2]);
                        }
                    }
                }
                for j in 0..per_block {
                    // Each row's weights as stored: unsigned (Q6_K's plus 32), Q8_0's signed bytes as they are.
                    let mut q = [[0u8; QK]; ROWS];
                    for (r, q) in q.iter_mut().enumerate() {
                        let unit = format.unit(row(r), b * per_block + j);
                        for (v, u) in q.iter_mut().zip(unit.q) {
                            *v = if format == Format::Q6K { (u + 32) as u8 } else { u as u8 };
                        }
                    }
                    let body = &mut tile[head_bytes(format) + j * unit_bytes(format)..][..unit_bytes(format)];
                    body.fill(0);
                    let at = |g: usize, r: usize, p: usize| q[r][4 * g + p];
                    if format == Format::Q8_0 {
                        for (g, r, p) in cells() {
                            body[32 * g + 4 * r + p] = at(g, r, p);
                        }
                        continue;
                    }
                    let nibbles = if matches!(format, Format::Q5_0 | Format::Q5K) { 32 } else { 0 };
                    for (g, r, p) in cells() {
                        body[nibbles + 32 * (g % 4) + 4 * r + p] |= (at(g, r, p) & 0x0f) << (4 * (g / 4));
                        match format {
                            Format::Q5_0 | Format::Q5K => {
                                body[4 * g + r / 2] |= (at(g, r, p) >> 4) << (4 * (r % 2) + p)
                            }
                            Format::Q6K => body[128 + 32 * (g % 2) + 4 * r + p] |= (at(g, r, p) >> 4) << (2 * (g / 2)),
                            _ => {}
                        }
                    }
                }
            }
        },
    );
}

/// Every (group, row, column of the group) of a unit.
fn cells() -> impl Iterator<Item = (usize, usize, usize)> {
    (0..8).flat_map(|g| (0..ROWS).flat_map(move |r| (0..4).map(move |p| (g, r, p))))
}

/// Unit `j` of row `r` (of eight) of a tile, as [`Format::unit`] gives it from the row's own block.
fn unit(format: Format, tile: &[u8], r: usize, j: usize) -> Unit {
    let body = &tile[head_bytes(format) + j * unit_bytes(format)..][..unit_bytes(format)];
    let mut q = [0i8; QK];
    for (k, v) in q.iter_mut().enumerate() {
        let (g, p) = (k / 4, k % 4);
        *v = match format {
            Format::Q8_0 => body[32 * g + 4 * r + p] as i8,
            _ => {
                let nibbles = if matches!(format, Format::Q5_0 | Format::Q5K) { 32 } else { 0 };
                let low = (body[nibbles + 32 * (g % 4) + 4 * r + p] >> (4 * (g / 4))) & 0x0f;
                let high = match format {
                    Format::Q5_0 | Format::Q5K => ((body[4 * g + r / 2] >> (4 * (r % 2) + p)) & 1) << 4,
                    Format::Q6K => ((body[128 + 32 * (g % 2) + 4 * r + p] >> (2 * (g / 2))) & 3) << 4,
                    _ => 0,
                };
                let v = (low | high) as i8;
                if format == Format::Q6K { v - 32 } else { v }
            }
        };
    }
    let d = f16_at(tile, 2 * r);
    match format {
        Format::Q4K | Format::Q5K => {
            let (s, at) = (&tile[32 + 12 * j..], 4 * (r % 2));
            let (sc, m) = (s[r] & 63, (s[r] >> 6) | (((s[8 + r / 2] >> at) & 0x0f) << 2));
            Unit { q, scale: [d * f32::from(sc); 2], offset: -f16_at(tile, 16 + 2 * r) * f32::from(m) }
        }
        Format::Q6K => {
            let sc = |s: usize| d * f32::from(tile[16 + 8 * s + r] as i8);
            Unit { q, scale: [sc(2 * j), sc(2 * j + 1)], offset: 0.0 }
        }
        Format::Q4_0 => Unit { q, scale: [d; 2], offset: -8.0 * d },
        Format::Q4_1 => Unit { q, scale: [d; 2], offset: f16_at(tile, 16 + 2 * r) },
        Format::Q5_0 => Unit { q, scale: [d; 2], offset: -16.0 * d },
        Format::Q8_0 => Unit { q, scale: [d; 2], offset: 0.0 },
    }
}

/// Row `n` of an interleaved matrix of `cols` columns, as floats: bit for bit what the rows it was made of give.
pub fn dequantize_row(format: Format, bytes: &[u8], n: usize, cols: usize, out: &mut [f32]) {
    let (tb, per_block) = (tile_bytes(format), format.block_elems() / QK);
    let tiles = &bytes[n / ROWS * group_bytes(format, cols)..][..group_bytes(format, cols)];
    for (u, o) in out.chunks_exact_mut(QK).enumerate() {
        unit(format, &tiles[u / per_block * tb..][..tb], n % ROWS, u % per_block).dequantize(o);
    }
}

/// The portable kernel, in the vector kernels' order (each unit's exact integer sum, or each half's for Q6_K,
/// converted, times the product of the scales, fused into the running sum; then Q4_1's, Q4_K's and Q5_K's
/// offset times the activations' sum, fused), so it gives their bits: `out[t · 8 + r]` is row `r`'s dot product with
/// activation row `t`.
pub(super) fn scalar_rows(format: Format, tiles: &[u8], x: &Rows<'_>, out: &mut [f32]) {
    let (units, tb, per_block) = (x.cols / QK, tile_bytes(format), format.block_elems() / QK);
    let centre = match format {
        Format::Q4_0 => 8,
        Format::Q5_0 => 16,
        _ => 0,
    };
    for t in 0..x.rows {
        let mut acc = [0f32; ROWS];
        for u in 0..units {
            let tile = &tiles[u / per_block * tb..][..tb];
            let xb = t * units + u;
            let q = &x.q[xb * QK..][..QK];
            for (r, acc) in acc.iter_mut().enumerate() {
                let unit = unit(format, tile, r, u % per_block);
                let dot = |range: std::ops::Range<usize>| -> f32 {
                    range.map(|k| (i32::from(unit.q[k]) - centre) * i32::from(q[k])).sum::<i32>() as f32
                };
                if format == Format::Q6K {
                    *acc = dot(0..16).mul_add(unit.scale[0] * x.d[xb], *acc);
                    *acc = dot(16..32).mul_add(unit.scale[1] * x.d[xb], *acc);
                } else {
                    *acc = dot(0..32).mul_add(unit.scale[0] * x.d[xb], *acc);
                }
                if matches!(format, Format::Q4_1 | Format::Q4K | Format::Q5K) {
                    *acc = unit.offset.mul_add(x.s[xb], *acc);
                }
            }
        }
        out[t * ROWS..][..ROWS].copy_from_slice(&acc);
    }
}

/// The vector kernels, stamped out for AVX2 and AVX-512 VNNI (256-bit).
#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    /// How far ahead in a matrix's tiles the kernels prefetch.
    pub const PREFETCH_AHEAD: usize = 2048;

    /// `$dot_from(from, a, b)` adds the byte dot products of `a` (unsigned) and `b` (signed) to `from`'s lanes;
    /// `$vnni` says it cannot saturate (so Q8_0 is biased too) and AVX-512BW is there.
    macro_rules! tile_kernels {
        ($name:ident, $features:literal, $dot_from:path, $vnni:literal) => {
            pub mod $name {
                use std::arch::x86_64::*;

                use super::super::{ROWS, head_bytes, tile_bytes, unit_bytes};
                use super::PREFETCH_AHEAD;
                use crate::kernels::blocks::x86::{
                    Q4_0, Q4_1, Q4_K, Q5_0, Q5_K, Q6_K, Q8_0, bias_shift, bits_to_16s, bits_to_16s_bw,
                };
                use crate::kernels::{Format, QK, Rows};

                /// Dot products of a group of eight weight rows (their tiles) with every activation row:
                /// `out[t · 8 + r]`.
                ///
                /// # Safety
                /// The CPU has the features this kernel is compiled for.
                #[target_feature(enable = $features)]
                pub unsafe fn rows(format: Format, tiles: &[u8], x: &Rows<'_>, out: &mut [f32]) {
                    let units = x.cols / QK;
                    assert!(x.cols.is_multiple_of(format.block_elems()));
                    assert!(tiles.len() >= x.cols / format.block_elems() * tile_bytes(format));
                    assert!(out.len() >= x.rows * ROWS);
                    assert!(
                        x.q.len() >= x.rows * x.cols && x.d.len().min(x.s.len()).min(x.halves.len()) >= x.rows * units
                    );
                    // SAFETY: bounds asserted above; the features are the caller's promise.
                    unsafe {
                        match format {
                            Format::Q4_0 => steps::<Q4_0>(tiles, x, out),
                            Format::Q5_0 => steps::<Q5_0>(tiles, x, out),
                            Format::Q8_0 => steps::<Q8_0>(tiles, x, out),
                            Format::Q4K => steps::<Q4_K>(tiles, x, out),
                            Format::Q5K => steps::<Q5_K>(tiles, x, out),
                            Format::Q6K => steps::<Q6_K>(tiles, x, out),
                            Format::Q4_1 => steps::<Q4_1>(tiles, x, out),
                        }
                    }
                }

                fn format_of(f: u8) -> Format {
                    match f {
                        Q4_0 => Format::Q4_0,
                        Q5_0 => Format::Q5_0,
                        Q8_0 => Format::Q8_0,
                        Q4_K => Format::Q4K,
                        Q5_K => Format::Q5K,
                        Q4_1 => Format::Q4_1,
                        Q6_K => Format::Q6K,
                        _ => unreachable!("no format {f}"),
                    }
                }

                #[inline]
                #[target_feature(enable = $features)]
                unsafe fn steps<const F: u8>(tiles: &[u8], x: &Rows<'_>, out: &mut [f32]) {
                    let mut t0 = 0;
                    while t0 < x.rows {
                        let left = x.rows - t0;
                        // Fewer activation rows split each unit's sum over more chains of integer adds, so the
                        // dot products' latency stays hidden (the integers are exact, so the split changes
                        // nothing).
                        // SAFETY: rows t0..t0 + N exist.
                        t0 += unsafe {
                            if left >= 8 {
                                tile::<8, 1, F>(tiles, x, t0, out)
                            } else if left >= 4 {
                                tile::<4, 2, F>(tiles, x, t0, out)
                            } else if left >= 2 {
                                tile::<2, 4, F>(tiles, x, t0, out)
                            } else {
                                tile::<1, 4, F>(tiles, x, t0, out)
                            }
                        };
                    }
                }

                /// Group `g` of a unit's body as bytes `w + c` (signed Q8_0 bytes on AVX2; Q4_1's, Q4_K's and
                /// Q5_K's as they are).
                #[inline(always)]
                unsafe fn group<const F: u8>(body: *const u8, g: usize) -> __m256i {
                    // SAFETY: the body holds the format's groups; the caller has the features.
                    unsafe {
                        if F == Q8_0 {
                            let w = _mm256_loadu_si256(body.add(32 * g).cast());
                            return if $vnni { _mm256_xor_si256(w, _mm256_set1_epi8(i8::MIN)) } else { w };
                        }
                        let five = F == Q5_0 || F == Q5_K;
                        let nibbles = if five { 32 } else { 0 };
                        let chunk = _mm256_loadu_si256(body.add(nibbles + 32 * (g % 4)).cast());
                        let chunk = if g < 4 { chunk } else { _mm256_srli_epi16(chunk, 4) };
                        let low = _mm256_and_si256(chunk, _mm256_set1_epi8(0x0f));
                        if five {
                            let bits = std::ptr::read_unaligned(body.add(4 * g).cast::<u32>());
                            let high = if $vnni { bits_to_16s_bw(bits) } else { bits_to_16s(bits) };
                            _mm256_or_si256(low, high)
                        } else if F == Q6_K {
                            let pairs = _mm256_loadu_si256(body.add(128 + 32 * (g % 2)).cast());
                            let pairs = _mm256_srl_epi16(pairs, _mm_cvtsi32_si128(2 * (g / 2) as i32));
                            let high = _mm256_slli_epi16(_mm256_and_si256(pairs, _mm256_set1_epi8(3)), 4);
                            _mm256_or_si256(low, high)
                        } else {
                            low
                        }
                    }
                }

                /// Eight weight rows against activation rows `t0..t0 + N`, each unit's integer sums split over
                /// `K` chains (Q6_K: over its two halves). Every activation row has its own accumulator, summed
                /// in the same order whatever N and K are, so a row's result never depends on what shares its
                /// step. Returns N.
                #[inline]
                #[target_feature(enable = $features)]
                unsafe fn tile<const N: usize, const K: usize, const F: u8>(
                    tiles: &[u8],
                    x: &Rows<'_>,
                    t0: usize,
                    out: &mut [f32],
                ) -> usize {
                    let format = format_of(F);
                    let (tb, hb, ub) = (tile_bytes(format), head_bytes(format), unit_bytes(format));
                    let per_block = format.block_elems() / QK;
                    // Q4_1, Q4_K and Q5_K are unsigned, with an offset per unit (Q4_1's added, the K-quants'
                    // taken away).
                    let offsets = F == Q4_1 || F == Q4_K || F == Q5_K;
                    let biased = !offsets && ($vnni || F != Q8_0);
                    let shift = if biased { bias_shift(F) } else { 0 };
                    let units = x.cols / QK;
                    let (q, xd, xs, halves) = (x.q.as_ptr(), x.d.as_ptr(), x.s.as_ptr(), x.halves.as_ptr());
                    let mut acc = [_mm256_setzero_ps(); N];
                    for first in (0..units).step_by(per_block) {
                        // SAFETY: the tile of units first..first + per_block and those units of rows t0..t0 + N
                        // are in bounds (`rows`' asserts).
                        unsafe {
                            let tile = tiles.as_ptr().add(first / per_block * tb);
                            for line in (0..tb).step_by(64) {
                                _mm_prefetch::<_MM_HINT_T0>(tile.wrapping_add(PREFETCH_AHEAD + line).cast());
                            }
                            let d = _mm256_cvtph_ps(_mm_loadu_si128(tile.cast()));
                            // The K-quants' dmin, Q4_1's m.
                            let dmin = if offsets { _mm256_cvtph_ps(_mm_loadu_si128(tile.add(16).cast())) } else { d };
                            for j in 0..per_block {
                                let u = first + j;
                                let body = tile.add(hb + j * ub);
                                // The unit's scale (Q6_K: each half's) and offset in each row's lane.
                                let (scale, scale_b, offset) = if F == Q4_1 {
                                    (d, d, dmin)
                                } else if offsets {
                                    let s = tile.add(32 + 12 * j);
                                    let bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(s.cast()));
                                    let sc = _mm256_and_si256(bytes, _mm256_set1_epi32(63));
                                    let high = _mm256_srlv_epi32(
                                        _mm256_set1_epi32(std::ptr::read_unaligned(s.add(8).cast::<i32>())),
                                        _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28),
                                    );
                                    let m = _mm256_or_si256(
                                        _mm256_srli_epi32(bytes, 6),
                                        _mm256_slli_epi32(_mm256_and_si256(high, _mm256_set1_epi32(15)), 2),
                                    );
                                    let sc = _mm256_mul_ps(d, _mm256_cvtepi32_ps(sc));
                                    (sc, sc, _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(m)))
                                } else if F == Q6_K {
                                    let sc = |s: usize| {
                                        let v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(tile.add(16 + 8 * s).cast()));
                                        _mm256_mul_ps(d, _mm256_cvtepi32_ps(v))
                                    };
                                    (sc(2 * j), sc(2 * j + 1), d)
                                } else {
                                    (d, d, d)
                                };
                                let mut sum = [[_mm256_setzero_si256(); K]; N];
                                let mut sum_b = [_mm256_setzero_si256(); N];
                                if biased {
                                    for i in 0..N {
                                        // -c · Σq: takes the bias back out of the unit's (or half's) sum.
                                        let h = *halves.add((t0 + i) * units + u);
                                        if F == Q6_K {
                                            sum[i][0] = _mm256_set1_epi32(h[0] << shift);
                                            sum_b[i] = _mm256_set1_epi32(h[1] << shift);
                                        } else {
                                            sum[i][0] = _mm256_set1_epi32((h[0] + h[1]) << shift);
                                        }
                                    }
                                }
                                for g in 0..8 {
                                    let w = group::<F>(body, g);
                                    let w_abs = if biased || offsets { w } else { _mm256_sign_epi8(w, w) };
                                    for i in 0..N {
                                        let at = q.add(((t0 + i) * units + u) * QK + 4 * g);
                                        let v = _mm256_set1_epi32(std::ptr::read_unaligned(at.cast::<i32>()));
                                        // Q8_0 on AVX2: |w| · (v · sign(w)) = w · v.
                                        let v = if biased || offsets { v } else { _mm256_sign_epi8(v, w) };
                                        if F == Q6_K && g >= 4 {
                                            sum_b[i] = $dot_from(sum_b[i], w_abs, v);
                                        } else {
                                            sum[i][g % K] = $dot_from(sum[i][g % K], w_abs, v);
                                        }
                                    }
                                }
                                for i in 0..N {
                                    let mut total = sum[i][0];
                                    for k in 1..K {
                                        total = _mm256_add_epi32(total, sum[i][k]);
                                    }
                                    let xb = (t0 + i) * units + u;
                                    let dx = _mm256_set1_ps(*xd.add(xb));
                                    acc[i] =
                                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_mul_ps(scale, dx), acc[i]);
                                    if F == Q6_K {
                                        let half = _mm256_cvtepi32_ps(sum_b[i]);
                                        acc[i] = _mm256_fmadd_ps(half, _mm256_mul_ps(scale_b, dx), acc[i]);
                                    }
                                    if F == Q4_1 {
                                        acc[i] = _mm256_fmadd_ps(offset, _mm256_set1_ps(*xs.add(xb)), acc[i]);
                                    } else if offsets {
                                        acc[i] = _mm256_fnmadd_ps(offset, _mm256_set1_ps(*xs.add(xb)), acc[i]);
                                    }
                                }
                            }
                        }
                    }
                    for i in 0..N {
                        // SAFETY: `out` holds eight results per activation row (asserted by `rows`).
                        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add((t0 + i) * ROWS), acc[i]) };
                    }
                    N
                }
            }
        };
    }

    tile_kernels!(avx2, "avx2,fma,f16c", crate::kernels::simd::x86::dot_u8_i8_from_avx2, false);
    tile_kernels!(
        vnni,
        "avx2,fma,f16c,avx512vnni,avx512vl,avx512bw",
        crate::kernels::simd::x86::dot_u8_i8_from_vnni,
        true
    );
}
