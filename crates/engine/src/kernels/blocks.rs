//! The GGUF block formats the kernels multiply without expanding them (ggml's `block_q4_0` … `block_q6_K`), and
//! one generic kernel for those without a hand-tuned one of their own.
//!
//! Every format is read as **units** of 32 weights, one per block of 32 quantized activations: weight `j` of a
//! unit is `scale[j / 16] · q[j] + offset`, with small integers `q`. A 32-weight format (Q4_0, Q5_0) is one unit
//! per block; a K-quant super-block of 256 is eight (Q4_K and Q5_K: one sub-block each, with its 6-bit scale and
//! minimum; Q6_K: two sub-blocks of 16 with their 8-bit scales). So `unit · x = Σ_h scale[h] · d_x · Σ q · q_x +
//! offset · s_x`, the integer sums in SIMD registers and `s_x = d_x · Σ q_x` from the activations' quantization.

use candle_core::quantized::GgmlDType;

use super::{QK, Rows, f16_at};

/// Elements in a K-quant super-block.
pub const QK_K: usize = 256;

/// How a quantized weight matrix's rows are stored (ggml's block layouts, byte for byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// f16 d, 16 bytes of nibbles: x = d · (q - 8).
    Q4_0,
    /// f16 d, f16 m, 16 bytes of nibbles: x = d · q + m.
    Q4_1,
    /// f16 d, 32 high bits, 16 bytes of nibbles: x = d · (q - 16).
    Q5_0,
    /// f16 d, 32 signed bytes: x = d · q.
    Q8_0,
    /// f16 d, f16 dmin, 12 bytes of 6-bit scales and minimums, 128 bytes of nibbles: x = d · sc · q - dmin · m.
    Q4K,
    /// Q4_K with a fifth bit per weight (32 bytes of high bits).
    Q5K,
    /// 128 bytes of low nibbles, 64 of high pairs, 16 signed scales, f16 d: x = d · sc · (q - 32).
    Q6K,
}

impl Format {
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q8_0 => Self::Q8_0,
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q5K => Self::Q5K,
            GgmlDType::Q6K => Self::Q6K,
            _ => return None,
        })
    }

    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }

    /// Weights per block.
    pub fn block_elems(self) -> usize {
        match self {
            Self::Q4K | Self::Q5K | Self::Q6K => QK_K,
            _ => QK,
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    /// Bytes of a row of `cols` weights (`cols` a multiple of `block_elems`).
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_elems() * self.block_bytes()
    }

    /// Where unit `u` of a row starts: its block's bytes and its index within the block.
    fn block(self, row: &[u8], u: usize) -> (&[u8], usize) {
        let per_block = self.block_elems() / QK;
        (&row[u / per_block * self.block_bytes()..][..self.block_bytes()], u % per_block)
    }

    /// Unit `u` of a row, decoded the plain way: the portable kernel and dequantization.
    pub fn unit(self, row: &[u8], u: usize) -> Unit {
        let (b, j) = self.block(row, u);
        let mut q = [0i8; QK];
        let nibbles = |q: &mut [i8; QK], qs: &[u8]| {
            for l in 0..16 {
                q[l] = (qs[l] & 0x0f) as i8;
                q[l + 16] = (qs[l] >> 4) as i8;
            }
        };
        match self {
            Self::Q4_0 => {
                let d = f16_at(b, 0);
                nibbles(&mut q, &b[2..18]);
                Unit { q, scale: [d; 2], offset: -8.0 * d }
            }
            Self::Q4_1 => {
                let d = f16_at(b, 0);
                nibbles(&mut q, &b[4..20]);
                Unit { q, scale: [d; 2], offset: f16_at(b, 2) }
            }
            Self::Q5_0 => {
                let d = f16_at(b, 0);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                nibbles(&mut q, &b[6..22]);
                for (l, v) in q.iter_mut().enumerate() {
                    *v |= (((qh >> l) & 1) << 4) as i8;
                }
                Unit { q, scale: [d; 2], offset: -16.0 * d }
            }
            Self::Q8_0 => {
                for (v, &byte) in q.iter_mut().zip(&b[2..34]) {
                    *v = byte as i8;
                }
                Unit { q, scale: [f16_at(b, 0); 2], offset: 0.0 }
            }
            Self::Q4K | Self::Q5K => {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let (sc, m) = scale_min_k4(j, &b[4..16]);
                let (qh, qs) = if self == Self::Q4K { (None, &b[16..144]) } else { (Some(&b[16..48]), &b[48..176]) };
                let shift = 4 * (j % 2);
                for (l, v) in q.iter_mut().enumerate() {
                    let high = qh.map_or(0, |qh| ((qh[l] >> j) & 1) << 4);
                    *v = (((qs[32 * (j / 2) + l] >> shift) & 0x0f) | high) as i8;
                }
                Unit { q, scale: [d * f32::from(sc); 2], offset: -dmin * f32::from(m) }
            }
            Self::Q6K => {
                let (n, r) = (j / 4, j % 4);
                let (ql, qh) = (&b[64 * n + 32 * (r & 1)..][..32], &b[128 + 32 * n..][..32]);
                for (l, v) in q.iter_mut().enumerate() {
                    let low = (ql[l] >> (4 * (r >> 1))) & 0x0f;
                    let high = (qh[l] >> (2 * r)) & 3;
                    *v = (low | (high << 4)) as i8 - 32;
                }
                let d = f16_at(b, 208);
                let sc = |i: usize| d * f32::from(b[192 + 8 * n + 2 * r + i] as i8);
                Unit { q, scale: [sc(0), sc(1)], offset: 0.0 }
            }
        }
    }

    /// Row `n` of a matrix of `cols` columns in this format, as floats.
    pub fn dequantize_row(self, bytes: &[u8], n: usize, cols: usize, out: &mut [f32]) {
        let row = &bytes[n * self.row_bytes(cols)..][..self.row_bytes(cols)];
        for (u, o) in out.chunks_exact_mut(QK).enumerate() {
            self.unit(row, u).dequantize(o);
        }
    }
}

/// 32 weights as `scale[j / 16] · q[j] + offset`.
#[derive(Debug, Clone, Copy)]
pub struct Unit {
    pub q: [i8; QK],
    pub scale: [f32; 2],
    pub offset: f32,
}

impl Unit {
    /// The unit's 32 weights as floats, into `out`.
    pub fn dequantize(&self, out: &mut [f32]) {
        for (j, (o, q)) in out.iter_mut().zip(self.q).enumerate() {
            *o = self.scale[j / 16] * f32::from(q) + self.offset;
        }
    }
}

/// Sub-block `j`'s 6-bit scale and minimum in a Q4_K / Q5_K block's 12 packed bytes (ggml's
/// `get_scale_min_k4`): the first four in the low six bits of bytes 0..8, the last four split between the
/// nibbles of bytes 8..12 and the top two bits of bytes 0..8.
#[inline]
pub(super) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// The portable kernel: every unit decoded with [`Format::unit`], its integer sums in order.
pub(super) fn scalar_row(format: Format, row: &[u8], x: &Rows<'_>, out: &mut [f32]) {
    assert!(x.cols.is_multiple_of(format.block_elems()), "rows of {} are not whole {format:?} blocks", x.cols);
    let units = x.cols / QK;
    for (t, o) in out.iter_mut().enumerate() {
        let mut total = 0f32;
        for u in 0..units {
            let unit = format.unit(row, u);
            let xb = t * units + u;
            let q = &x.q[xb * QK..][..QK];
            let half =
                |h: usize| -> i32 { (16 * h..16 * h + 16).map(|j| i32::from(unit.q[j]) * i32::from(q[j])).sum() };
            total +=
                x.d[xb] * (unit.scale[0] * half(0) as f32 + unit.scale[1] * half(1) as f32) + unit.offset * x.s[xb];
        }
        *o = total;
    }
}

/// The SIMD unit decoders (AVX2) and the generic kernel over them, stamped out per instruction set like the
/// hand-tuned kernels.
#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    use super::scale_min_k4;

    /// A unit in registers: 32 weights (bytes in element order), the scale of each of the eight 32-bit lanes a
    /// byte dot product gives (lanes 0..4 sum bytes 0..16), and the offset. A [`signed`] format's bytes are signed,
    /// or the unsigned `w + c` when decoded for the VNNI kernel (`U`); the others' are unsigned.
    #[derive(Clone, Copy)]
    pub struct Unit {
        pub w: __m256i,
        pub scale: __m256,
        pub offset: f32,
    }

    impl Unit {
        // SAFETY: all-zero bits are a valid value of every field.
        pub const ZERO: Self = unsafe { std::mem::zeroed() };
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn f16x2(lo: u8, hi: u8, lo2: u8, hi2: u8) -> (f32, f32) {
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([lo, hi, lo2, hi2])));
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_shuffle_ps(v, v, 1)))
    }

    /// 16 packed bytes as 32 nibbles: low nibbles are elements 0..16, high nibbles 16..32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn nibbles16(qs: &[u8]) -> __m256i {
        // SAFETY: `qs` holds 16 bytes.
        let packed = unsafe { _mm_loadu_si128(qs[..16].as_ptr().cast()) };
        let mask = _mm_set1_epi8(0x0f);
        _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), mask), _mm_and_si128(packed, mask))
    }

    /// 32 bytes, each 0x10 where bit `j` of `bits` is set.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) fn bits_to_16s(bits: u32) -> __m256i {
        // Byte j of every lane gets byte j / 8 of `bits`, then keeps bit j % 8.
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(bits as i32),
            _mm256_setr_epi64x(0, 0x0101_0101_0101_0101, 0x0202_0202_0202_0202, 0x0303_0303_0303_0303),
        );
        let select = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn load32(bytes: &[u8]) -> __m256i {
        // SAFETY: `bytes` holds 32 bytes.
        unsafe { _mm256_loadu_si256(bytes[..32].as_ptr().cast()) }
    }

    /// Nibble `shift / 4` of each of 32 bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn nibbles32(bytes: &[u8], shift: i32) -> __m256i {
        _mm256_and_si256(_mm256_srl_epi16(load32(bytes), _mm_cvtsi32_si128(shift)), _mm256_set1_epi8(0x0f))
    }

    /// A block's scales and offsets, read once for all its units: `scale[j]` and `offset[j]` of unit `j`
    /// (Q6_K: `scale[0]` is its d).
    #[derive(Clone, Copy)]
    pub struct Head {
        pub scale: [f32; 16],
        pub offset: [f32; 8],
    }

    impl Head {
        pub const ZERO: Self = Self { scale: [0.0; 16], offset: [0.0; 8] };
    }

    // The heads (and `d32`) are always inlined (a call per block and row measured about 1% of a prompt), so
    // they cannot carry target features themselves; only the kernels, which have F16C, call them.

    /// A 32-weight block's scale, its first two bytes. These blocks need no head: a head per block and row cost
    /// a one-row step half its speed on Q8_0.
    #[inline(always)]
    fn d32(b: &[u8]) -> f32 {
        // SAFETY: see above.
        unsafe { f16x2(b[0], b[1], 0, 0).0 }
    }

    #[inline(always)]
    fn head_k4(b: &[u8]) -> Head {
        // SAFETY: see `d32`.
        let (d, dmin) = unsafe { f16x2(b[0], b[1], b[2], b[3]) };
        let mut head = Head::ZERO;
        for j in 0..8 {
            let (sc, m) = scale_min_k4(j, &b[4..16]);
            head.scale[j] = d * f32::from(sc);
            head.offset[j] = -dmin * f32::from(m);
        }
        head
    }

    #[inline(always)]
    fn head_q6_k(b: &[u8]) -> Head {
        // SAFETY: see `d32`.
        let d = unsafe { f16x2(b[208], b[209], 0, 0).0 };
        // Only d: the unit multiplies in its two sub-blocks' scales. Sixteen scales written here as one wide
        // store and read back one by one stalled every unit (a one-row step ran at half speed).
        let mut head = Head::ZERO;
        head.scale[0] = d;
        head
    }

    /// `biased` bytes `w + c` as they are (`U`, the VNNI kernel's unsigned operand), or the signed `w`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn unbias<const U: bool>(biased: __m256i, c: i8) -> __m256i {
        if U { biased } else { _mm256_sub_epi8(biased, _mm256_set1_epi8(c)) }
    }

    /// Signed: q - 8 (with `U`, q).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn q4_0<const U: bool>(b: &[u8], _: usize, _: &Head) -> Unit {
        Unit { w: unbias::<U>(nibbles16(&b[2..18]), 8), scale: _mm256_set1_ps(d32(b)), offset: 0.0 }
    }

    /// Signed: q - 16 (with `U`, q). `BW`: the high bits expanded by an AVX-512BW mask move (the caller has AVX-512BW and VL).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn q5_0<const BW: bool, const U: bool>(b: &[u8], _: usize, _: &Head) -> Unit {
        let bits = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        // SAFETY: the caller's promise when BW.
        let high = if BW { unsafe { bits_to_16s_bw(bits) } } else { bits_to_16s(bits) };
        let w = unbias::<U>(_mm256_or_si256(nibbles16(&b[6..22]), high), 16);
        Unit { w, scale: _mm256_set1_ps(d32(b)), offset: 0.0 }
    }

    /// `bits_to_16s` in two instructions.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512bw,avx512vl")]
    pub(crate) fn bits_to_16s_bw(bits: u32) -> __m256i {
        _mm256_maskz_mov_epi8(bits, _mm256_set1_epi8(0x10))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn q8_0<const U: bool>(b: &[u8], _: usize, _: &Head) -> Unit {
        let w = load32(&b[2..34]);
        // w + 128 as unsigned bytes: the sign bit flipped.
        let w = if U { _mm256_xor_si256(w, _mm256_set1_epi8(i8::MIN)) } else { w };
        Unit { w, scale: _mm256_set1_ps(d32(b)), offset: 0.0 }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn q4_k(b: &[u8], j: usize, head: &Head) -> Unit {
        let w = nibbles32(&b[16 + 32 * (j / 2)..], 4 * (j % 2) as i32);
        Unit { w, scale: _mm256_set1_ps(head.scale[j]), offset: head.offset[j] }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn q5_k(b: &[u8], j: usize, head: &Head) -> Unit {
        let low = nibbles32(&b[48 + 32 * (j / 2)..], 4 * (j % 2) as i32);
        // Bit j of each high byte, moved to bit 4 (a 16-bit shift: bit 0 of each byte is its own bit j).
        let bit =
            _mm256_and_si256(_mm256_srl_epi16(load32(&b[16..48]), _mm_cvtsi32_si128(j as i32)), _mm256_set1_epi8(1));
        let w = _mm256_or_si256(low, _mm256_slli_epi16(bit, 4));
        Unit { w, scale: _mm256_set1_ps(head.scale[j]), offset: head.offset[j] }
    }

    /// Signed: q - 32 (with `U`, q); sub-block `2j` scales the first 16 weights, `2j + 1` the rest.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn q6_k<const U: bool>(b: &[u8], j: usize, head: &Head) -> Unit {
        let (n, r) = (j / 4, j % 4);
        let low = nibbles32(&b[64 * n + 32 * (r & 1)..], 4 * (r >> 1) as i32);
        let high = _mm256_and_si256(
            _mm256_srl_epi16(load32(&b[128 + 32 * n..]), _mm_cvtsi32_si128(2 * r as i32)),
            _mm256_set1_epi8(3),
        );
        let w = unbias::<U>(_mm256_or_si256(low, _mm256_slli_epi16(high, 4)), 32);
        let sc = |i: usize| head.scale[0] * f32::from(b[192 + 2 * j + i] as i8);
        let scale = _mm256_set_m128(_mm_set1_ps(sc(1)), _mm_set1_ps(sc(0)));
        Unit { w, scale, offset: 0.0 }
    }

    /// The formats the generic kernel stamps out (a const parameter, so each decoder is inlined).
    pub const Q4_0: u8 = 0;
    pub const Q5_0: u8 = 1;
    pub const Q4_K: u8 = 2;
    pub const Q5_K: u8 = 3;
    pub const Q6_K: u8 = 4;
    pub const Q8_0: u8 = 5;
    /// Q4_1, which only the interleaved kernels take this way (the row-at-a-time ones have a kernel of its own).
    pub const Q4_1: u8 = 6;

    /// Whether a format's weights are signed (no offset: AVX2's sign trick, or the VNNI kernel's bias), or
    /// unsigned with an offset per unit.
    pub const fn signed(format: u8) -> bool {
        format != Q4_K && format != Q5_K
    }

    /// log2 of the `c` a signed format's weights are stored with (`w + c` in bytes 0..2c; 128 for Q8_0's
    /// flipped sign bit).
    pub const fn bias_shift(format: u8) -> i32 {
        match format {
            Q4_0 => 3,
            Q5_0 => 4,
            Q6_K => 5,
            Q8_0 => 7,
            _ => panic!("only signed formats are biased"),
        }
    }

    /// Whether a format's blocks are K-quant super-blocks of eight units with a head of scales.
    pub const fn super_blocks(format: u8) -> bool {
        matches!(format, Q4_K | Q5_K | Q6_K)
    }

    /// A super-block's head (Q4_K, Q5_K, Q6_K).
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C.
    #[inline(always)]
    pub unsafe fn head<const F: u8>(block: &[u8]) -> Head {
        match F {
            Q4_K | Q5_K => head_k4(block),
            _ => head_q6_k(block),
        }
    }

    /// Unit `j` of a block; with `U`, a signed format's weights as the unsigned bytes `w + c` (see
    /// [`bias_shift`]).
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C, and with `BW` AVX-512BW and VL.
    #[inline(always)]
    pub unsafe fn decode<const F: u8, const BW: bool, const U: bool>(block: &[u8], j: usize, head: &Head) -> Unit {
        // SAFETY: as for `head`.
        unsafe {
            match F {
                Q4_0 => q4_0::<U>(block, j, head),
                Q5_0 => q5_0::<BW, U>(block, j, head),
                Q8_0 => q8_0::<U>(block, j, head),
                Q4_K => q4_k(block, j, head),
                Q5_K => q5_k(block, j, head),
                _ => q6_k::<U>(block, j, head),
            }
        }
    }

    /// How far ahead in a weight row the generic kernel prefetches.
    pub const PREFETCH_AHEAD: usize = 2048;

    /// The generic kernel for one instruction set: `$dot` is its byte dot product, `$bw` whether it has
    /// AVX-512BW, and `$wide` the most activation rows a tile of one or two rows of signed weights takes (its
    /// accumulators must fit the registers: 16 on AVX2, 32 with AVX-512VL; four weight rows take four). `$biased`: signed formats are decoded as unsigned `w + c`
    /// and each dot product starts from `-c · Σq` (per lane, from the activations) by `$dot_from`, a byte dot product
    /// added to its first operand that cannot saturate; otherwise by the sign trick, which costs an instruction
    /// per weight row and activation row where this costs one per activation row.
    macro_rules! unit_kernels {
        ($name:ident, $features:literal, $dot:path, $dot_from:path, $biased:literal, $bw:literal, $wide:literal) => {
            pub mod $name {
                use std::arch::x86_64::*;

                use super::super::{Format, QK};
                use super::{
                    Head, PREFETCH_AHEAD, Q4_0, Q4_K, Q5_0, Q5_K, Q6_K, Q8_0, Unit, bias_shift, decode, head, signed,
                    super_blocks,
                };
                use crate::kernels::Rows;

                /// Dot products of `R` weight rows in `format` with every activation row: `out[r][t]` is row
                /// `r`'s with activation row `t`.
                ///
                /// # Safety
                /// The CPU has the features this kernel is compiled for.
                #[target_feature(enable = $features)]
                pub unsafe fn rows<const R: usize>(
                    format: Format,
                    rows: [&[u8]; R],
                    x: &Rows<'_>,
                    out: &mut [&mut [f32]; R],
                ) {
                    assert!(
                        x.cols.is_multiple_of(format.block_elems()),
                        "rows of {} are not whole {format:?} blocks",
                        x.cols
                    );
                    for (row, out) in rows.iter().zip(out.iter()) {
                        assert!(row.len() >= format.row_bytes(x.cols) && out.len() >= x.rows);
                    }
                    let blocks = x.rows * x.cols / QK;
                    assert!(x.q.len() >= x.rows * x.cols && x.d.len().min(x.s.len()).min(x.lanes.len()) >= blocks);
                    // SAFETY: bounds asserted above; the features are the caller's promise.
                    unsafe {
                        match format {
                            Format::Q4_0 => tiles::<R, Q4_0>(format, &rows, x, out),
                            Format::Q5_0 => tiles::<R, Q5_0>(format, &rows, x, out),
                            Format::Q4K => tiles::<R, Q4_K>(format, &rows, x, out),
                            Format::Q5K => tiles::<R, Q5_K>(format, &rows, x, out),
                            Format::Q6K => tiles::<R, Q6_K>(format, &rows, x, out),
                            Format::Q8_0 => tiles::<R, Q8_0>(format, &rows, x, out),
                            Format::Q4_1 => unreachable!("{format:?} has a kernel of its own"),
                        }
                    }
                }

                #[inline]
                #[target_feature(enable = $features)]
                unsafe fn tiles<const R: usize, const F: u8>(
                    format: Format,
                    rows: &[&[u8]; R],
                    x: &Rows<'_>,
                    out: &mut [&mut [f32]; R],
                ) {
                    // Unsigned formats keep a scalar offset per accumulator too, and four weight rows have four
                    // times the accumulators, so they take fewer activation rows.
                    let most = if signed(F) && F != Q6_K && R <= 2 { $wide } else { 4 };
                    let mut t0 = 0;
                    while t0 < x.rows {
                        let left = x.rows - t0;
                        // SAFETY: rows t0..t0 + n exist.
                        let n = unsafe {
                            if most >= 8 && left >= 8 {
                                tile::<R, 8, F>(format, rows, x, t0, out)
                            } else if left >= 4 {
                                tile::<R, 4, F>(format, rows, x, t0, out)
                            } else if left >= 2 {
                                tile::<R, 2, F>(format, rows, x, t0, out)
                            } else {
                                tile::<R, 1, F>(format, rows, x, t0, out)
                            }
                        };
                        t0 += n;
                    }
                }

                /// Weight rows `0..R` against activation rows `t0..t0 + N`: each unit of each weight row decoded
                /// once for all N, each activation block loaded once for all R. Every (weight row, activation
                /// row) pair has its own accumulators, summed in the same order whatever R and N are, so a row's
                /// result never depends on what shares its step. Q4_0, Q5_0, Q8_0 and Q6_K's weights are
                /// signed (Q4_K's and Q5_K's unsigned, with an offset). Returns N.
                #[inline]
                #[target_feature(enable = $features)]
                unsafe fn tile<const R: usize, const N: usize, const F: u8>(
                    format: Format,
                    rows: &[&[u8]; R],
                    x: &Rows<'_>,
                    t0: usize,
                    out: &mut [&mut [f32]; R],
                ) -> usize {
                    let signed = signed(F);
                    let biased = $biased && signed;
                    let shift = _mm_cvtsi32_si128(if biased { bias_shift(F) } else { 0 });
                    let units = x.cols / QK;
                    let (per_block, block_bytes) = (format.block_elems() / QK, format.block_bytes());
                    let mut acc = [[_mm256_setzero_ps(); N]; R];
                    let mut offset = [[0f32; N]; R];
                    let (q, xd, xs, lanes) = (x.q.as_ptr(), x.d.as_ptr(), x.s.as_ptr(), x.lanes.as_ptr());
                    let mut heads = [Head::ZERO; R];
                    for first in (0..units).step_by(per_block) {
                        // SAFETY: the block of units first..first + per_block of every weight row, and block u of
                        // rows t0..t0 + N, are in bounds (the caller's asserts).
                        unsafe {
                            // Loops rather than closures, which would not be compiled with this function's
                            // features.
                            let mut block = [&[][..]; R];
                            for r in 0..R {
                                let start = rows[r].as_ptr().add(first / per_block * block_bytes);
                                block[r] = std::slice::from_raw_parts(start, block_bytes);
                                // Ask for the row's bytes well ahead: a step of few rows streams the weights
                                // from memory, and the tile's loop is too long for the core to have enough
                                // loads in flight by itself (one-row steps measured half as fast without).
                                for line in (0..block_bytes).step_by(64) {
                                    _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(PREFETCH_AHEAD + line).cast());
                                }
                                if super_blocks(F) {
                                    heads[r] = head::<F>(block[r]);
                                }
                            }
                            for j in 0..per_block {
                                let u = first + j;
                                let mut unit = [Unit::ZERO; R];
                                let mut w = [_mm256_setzero_si256(); R];
                                for r in 0..R {
                                    unit[r] = decode::<F, $bw, $biased>(block[r], j, &heads[r]);
                                    w[r] = if signed && !biased {
                                        _mm256_sign_epi8(unit[r].w, unit[r].w)
                                    } else {
                                        unit[r].w
                                    };
                                }
                                for i in 0..N {
                                    let xb = (t0 + i) * units + u;
                                    let qv = _mm256_loadu_si256(q.add(xb * QK).cast());
                                    let (dx, sx) = (_mm256_set1_ps(*xd.add(xb)), *xs.add(xb));
                                    // -c · Σq of each lane's four values.
                                    let bias = if biased {
                                        _mm256_sll_epi32(_mm256_loadu_si256(lanes.add(xb).cast()), shift)
                                    } else {
                                        _mm256_setzero_si256()
                                    };
                                    for r in 0..R {
                                        let scale = _mm256_mul_ps(unit[r].scale, dx);
                                        let dot = if biased {
                                            // (w + c) · q - c · Σq = w · q, exactly.
                                            _mm256_cvtepi32_ps($dot_from(bias, w[r], qv))
                                        } else if signed {
                                            // |w| · (q · sign(w)) = w · q, with the unsigned operand first.
                                            $dot(w[r], _mm256_sign_epi8(qv, unit[r].w))
                                        } else {
                                            $dot(w[r], qv)
                                        };
                                        acc[r][i] = _mm256_fmadd_ps(scale, dot, acc[r][i]);
                                        if !signed {
                                            offset[r][i] += unit[r].offset * sx;
                                        }
                                    }
                                }
                            }
                        }
                    }
                    for r in 0..R {
                        for i in 0..N {
                            let sum = crate::kernels::simd::x86::hsum(acc[r][i]);
                            // Signed formats add nothing (not even 0.0, which would turn a -0.0 into 0.0): Q8_0's
                            // one-row kernel gives the same bits.
                            out[r][t0 + i] = if signed { sum } else { sum + offset[r][i] };
                        }
                    }
                    N
                }
            }
        };
    }

    unit_kernels!(
        avx2,
        "avx2,fma,f16c",
        crate::kernels::simd::x86::dot_u8_i8_avx2,
        crate::kernels::simd::x86::dot_u8_i8_from_avx2,
        false,
        false,
        4
    );
    unit_kernels!(
        vnni,
        "avx2,fma,f16c,avx512vnni,avx512vl,avx512bw",
        crate::kernels::simd::x86::dot_u8_i8_vnni,
        crate::kernels::simd::x86::dot_u8_i8_from_vnni,
        true,
        true,
        8
    );
}
