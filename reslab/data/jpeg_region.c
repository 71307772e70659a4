/* Decoding only a region of a JPEG with libjpeg-turbo (issue 24's loader, data/jpeg.py).
 *
 * Sec. 3.4's training view is a 224x224 window of the image scaled to a shorter side of 256 to
 * 480 pixels: on an ImageNet-sized photograph it is resampled from a third of the image's pixels
 * on average. libjpeg-turbo can skip the rest: jpeg_crop_scanline() limits the inverse DCT, the
 * chroma upsampling and the colour conversion to the region's columns (widened to whole iMCUs),
 * jpeg_skip_scanlines() skips them for the rows above it, and decoding stops after its last row.
 * The Huffman decoding of the rows down to the region's bottom still runs (a JPEG without restart
 * markers cannot be entered mid-stream). The region's pixels are those of the full decode with
 * libjpeg's defaults (accurate integer IDCT, fancy upsampling), which data/jpeg.py's caller
 * checks in tests against torchvision's decoder of the same library.
 *
 * No Python here: data/jpeg.py calls these two functions through ctypes. Errors never exit the
 * process (libjpeg's default): they longjmp back and return the library's message; warnings
 * (a truncated or corrupt stream, which libjpeg would fill with grey) count as errors too.
 */
#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

struct failure {
  struct jpeg_error_mgr mgr;
  jmp_buf jump;
  char *message;
  int message_size;
};

static void fail(j_common_ptr cinfo) {
  struct failure *f = (struct failure *)cinfo->err;
  char text[JMSG_LENGTH_MAX];
  (*cinfo->err->format_message)(cinfo, text);
  snprintf(f->message, (size_t)f->message_size, "%s", text);
  longjmp(f->jump, 1);
}

static void warn(j_common_ptr cinfo, int level) {
  if (level < 0) fail(cinfo); /* corrupt data: libjpeg would go on with grey blocks */
}

static void quiet(j_common_ptr cinfo) { (void)cinfo; }

static int start(struct jpeg_decompress_struct *cinfo, struct failure *f,
                 const unsigned char *data, unsigned long size) {
  cinfo->err = jpeg_std_error(&f->mgr);
  f->mgr.error_exit = fail;
  f->mgr.emit_message = warn;
  f->mgr.output_message = quiet;
  jpeg_create_decompress(cinfo);
  jpeg_mem_src(cinfo, data, size);
  jpeg_read_header(cinfo, TRUE);
  return 0;
}

/* The image's width, height and colour space (libjpeg's J_COLOR_SPACE: 1 grey, 3 YCbCr, 4 CMYK,
 * 5 YCCK, 2 RGB), without decoding. 0, or -1 with the message. */
int reslab_jpeg_header(const unsigned char *data, unsigned long size, int *width, int *height,
                       int *color_space, char *message, int message_size) {
  struct jpeg_decompress_struct cinfo;
  struct failure f;
  f.message = message;
  f.message_size = message_size;
  if (setjmp(f.jump)) {
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  start(&cinfo, &f, data, size);
  *width = (int)cinfo.image_width;
  *height = (int)cinfo.image_height;
  *color_space = (int)cinfo.jpeg_color_space;
  jpeg_destroy_decompress(&cinfo);
  return 0;
}

/* Rows [top, bottom) and columns [left, right) of the image as RGB, written to `out` as rows of
 * *width pixels starting at column *x0 (the region widened to whole iMCUs: x0 <= left and
 * x0 + width >= right); `out` holds at least (bottom - top) * (right - left + 32) * 3 bytes.
 * Grey images come out with the grey value in all three channels. 0, or -1 with the message. */
int reslab_jpeg_region(const unsigned char *data, unsigned long size, int top, int bottom,
                       int left, int right, unsigned char *out, int *x0, int *width,
                       char *message, int message_size) {
  struct jpeg_decompress_struct cinfo;
  struct failure f;
  f.message = message;
  f.message_size = message_size;
  if (setjmp(f.jump)) {
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  start(&cinfo, &f, data, size);
  if (top < 0 || left < 0 || bottom > (int)cinfo.image_height || right > (int)cinfo.image_width ||
      top >= bottom || left >= right) {
    snprintf(message, (size_t)message_size, "region [%d, %d) x [%d, %d) is not inside %dx%d",
             top, bottom, left, right, (int)cinfo.image_width, (int)cinfo.image_height);
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  cinfo.out_color_space = JCS_RGB;
  jpeg_start_decompress(&cinfo);
  JDIMENSION xoffset = (JDIMENSION)left, cropped = (JDIMENSION)(right - left);
  jpeg_crop_scanline(&cinfo, &xoffset, &cropped);
  if ((int)(xoffset + cropped) < right || (int)cropped > right - left + 32) {
    snprintf(message, (size_t)message_size, "libjpeg widened the region to %u columns at %u",
             cropped, xoffset);
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  if (top > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)top);
  JSAMPROW row;
  for (int y = top; y < bottom; y++) {
    row = out + (size_t)(y - top) * cropped * 3;
    jpeg_read_scanlines(&cinfo, &row, 1);
  }
  *x0 = (int)xoffset;
  *width = (int)cropped;
  /* The rows below the region are never decoded: abort rather than finish. */
  jpeg_abort_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return 0;
}
