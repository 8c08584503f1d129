/* bench/overview.c - the README's overview figure, docs/overview.svg, from two CSVs.

   (a) accuracy against bits: attention-output error (log y) against bits per K/V
       element (steady state) on the real KV dumps, one series per dump: the configs
       kNvN (K and V at N bits, N <= 8, in KIVI's shape: key blocks of G tokens, fp16
       params; kvq_eval's config strings) from build/eval.csv
       (`make eval`, examples/kvq_eval.c --csv; the rows with layer "all"), and the
       KIVI-2 and llama.cpp q4_0 figures of ../shared/data/REFERENCE.md (copied below:
       REFERENCE is not in the CSV) for the dumps the CSV has.
   (b) speed against context: kvq fp16 median time / config median time against N for
       decode attention, GQA 32/8 on 1 thread (else the first layout and the fewest
       threads in the file), from build/bench.csv (bench/bench.c --csv); the CPU model
       and date come from its '#' lines.

   Build and run (`make figure` does both):
     cc -std=c99 -O2 -Wall -Wextra -Werror bench/overview.c -o build/overview -lm
     build/overview [--cpu TEXT] [--date TEXT] [--note TEXT] [--configs LIST] \
                    EVAL.csv BENCH.csv OUT.svg
   --configs: the bench configs panel (b) draws (default fp32,kvq-8,kvq-4,kvq-3,kvq-2,
   those of them in the file; kvq-16 is always the 1.0x line).
*/
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#define MAX_PTS 1024
#define MAX_FIELDS 64
#define MAX_DUMPS 6
#define MAX_CFGS 16
#define NAME_LEN 64
#define MAX_BOXES 256

/* ------------------------------------------------------------------------ */
/* Data.                                                                     */

typedef struct eval_pt {
    char dump[NAME_LEN], config[NAME_LEN];
    double bits, err;
} eval_pt;

typedef struct speed_pt {
    char config[NAME_LEN];
    int nq, threads, n;
    double ms;
} speed_pt;

typedef struct data {
    eval_pt ev[MAX_PTS];
    int n_ev;
    speed_pt sp[MAX_PTS];
    int n_sp;
    char cpu[160], date[64], kvq[64], eval_date[32];
} data;

/* REFERENCE.md's figures (attention error at steady bits) for the dumps it covers,
   as README.md's KV dumps table quotes them: matched by the dump file's name. */
static const struct reference {
    const char *dump_prefix;
    double kivi_bits, kivi_err, q4_bits, q4_err;
} REFS[] = {
    {"stories260K", 4.5, 1.9e-2, 6.0, 0.62},
    {"babyllama105", 3.5, 2.9e-3, 5.0, 2.4e-2},
    {"minilm", 3.0, 2.7e-2, 4.5, 1.2e-2},
};
#define N_REFS ((int)(sizeof REFS / sizeof REFS[0]))

static const struct reference *ref_for(const char *dump) {
    int i;
    for (i = 0; i < N_REFS; i++)
        if (!strncmp(dump, REFS[i].dump_prefix, strlen(REFS[i].dump_prefix))) return &REFS[i];
    return NULL;
}

static void die(const char *what, const char *detail) {
    fprintf(stderr, "overview: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    exit(1);
}

/* Splits line in place at commas (these CSVs quote nothing); returns the field count. */
static int split_fields(char *line, char **f, int max) {
    int n = 0;
    line[strcspn(line, "\r\n")] = 0;
    while (n < max) {
        f[n++] = line;
        line = strchr(line, ',');
        if (!line) break;
        *line++ = 0;
    }
    return n;
}

static int find_col(char *const *hdr, int n, const char *name, const char *path) {
    int i;
    for (i = 0; i < n; i++)
        if (!strcmp(hdr[i], name)) return i;
    fprintf(stderr, "overview: %s: no column \"%s\"\n", path, name);
    exit(1);
}

static double num(const char *s, const char *path, int line_no) {
    char *end;
    double v = strtod(s, &end);
    if (end == s || *end) {
        fprintf(stderr, "overview: %s:%d: \"%s\" is not a number\n", path, line_no, s);
        exit(1);
    }
    return v;
}

static void copy_name(char *dst, const char *src) { snprintf(dst, NAME_LEN, "%s", src); }

/* The rest of a "# key: value" line into out, when line is one for key. */
static void comment_value(const char *line, const char *key, char *out, size_t cap) {
    size_t k = strlen(key);
    if (strncmp(line, "# ", 2) || strncmp(line + 2, key, k) || line[2 + k] != ':') return;
    line += 3 + k;
    while (*line == ' ') line++;
    snprintf(out, cap, "%.*s", (int)strcspn(line, "\r\n"), line);
}

static void read_eval(data *d, const char *path) {
    FILE *f = fopen(path, "r");
    char line[1024], hdr_line[1024], *hdr[MAX_FIELDS], *fld[MAX_FIELDS];
    int n_hdr = 0, c_dump = 0, c_cfg = 0, c_layer = 0, c_bits = 0, c_err = 0, line_no = 0, nf;
    struct stat st;
    if (!f) die("cannot open", path);
    snprintf(d->eval_date, sizeof d->eval_date, "date unknown");
    if (stat(path, &st) == 0) strftime(d->eval_date, sizeof d->eval_date, "%Y-%m-%d", gmtime(&st.st_mtime));
    while (fgets(line, sizeof line, f)) {
        line_no++;
        if (line[0] == '#' || line[0] == '\n' || line[0] == '\r') continue;
        if (!n_hdr) {
            memcpy(hdr_line, line, sizeof line);
            n_hdr = split_fields(hdr_line, hdr, MAX_FIELDS);
            c_dump = find_col(hdr, n_hdr, "dump", path);
            c_cfg = find_col(hdr, n_hdr, "config", path);
            c_layer = find_col(hdr, n_hdr, "layer", path);
            c_bits = find_col(hdr, n_hdr, "bits_steady", path);
            c_err = find_col(hdr, n_hdr, "attn_err", path);
            continue;
        }
        nf = split_fields(line, fld, MAX_FIELDS);
        if (nf < n_hdr || strcmp(fld[c_layer], "all")) continue;
        if (d->n_ev == MAX_PTS) die("too many rows in", path);
        copy_name(d->ev[d->n_ev].dump, fld[c_dump]);
        copy_name(d->ev[d->n_ev].config, fld[c_cfg]);
        d->ev[d->n_ev].bits = num(fld[c_bits], path, line_no);
        d->ev[d->n_ev].err = num(fld[c_err], path, line_no);
        d->n_ev++;
    }
    fclose(f);
    if (!d->n_ev) die("no rows with layer \"all\" in", path);
}

static void read_bench(data *d, const char *path) {
    FILE *f = fopen(path, "r");
    char line[1024], hdr_line[1024], *hdr[MAX_FIELDS], *fld[MAX_FIELDS];
    int n_hdr = 0, c_kind = 0, c_cfg = 0, c_nq = 0, c_thr = 0, c_n = 0, c_ms = 0, line_no = 0, nf;
    if (!f) die("cannot open", path);
    while (fgets(line, sizeof line, f)) {
        line_no++;
        if (line[0] == '#') {
            comment_value(line, "cpu", d->cpu, sizeof d->cpu);
            comment_value(line, "date", d->date, sizeof d->date);
            comment_value(line, "kvq", d->kvq, sizeof d->kvq);
            continue;
        }
        if (line[0] == '\n' || line[0] == '\r') continue;
        if (!n_hdr) {
            memcpy(hdr_line, line, sizeof line);
            n_hdr = split_fields(hdr_line, hdr, MAX_FIELDS);
            c_kind = find_col(hdr, n_hdr, "kind", path);
            c_cfg = find_col(hdr, n_hdr, "config", path);
            c_nq = find_col(hdr, n_hdr, "n_q_heads", path);
            c_thr = find_col(hdr, n_hdr, "threads", path);
            c_n = find_col(hdr, n_hdr, "n_tokens", path);
            c_ms = find_col(hdr, n_hdr, "median_ms", path);
            continue;
        }
        nf = split_fields(line, fld, MAX_FIELDS);
        if (nf < n_hdr || strcmp(fld[c_kind], "attention")) continue;
        if (d->n_sp == MAX_PTS) die("too many rows in", path);
        copy_name(d->sp[d->n_sp].config, fld[c_cfg]);
        d->sp[d->n_sp].nq = (int)num(fld[c_nq], path, line_no);
        d->sp[d->n_sp].threads = (int)num(fld[c_thr], path, line_no);
        d->sp[d->n_sp].n = (int)num(fld[c_n], path, line_no);
        d->sp[d->n_sp].ms = num(fld[c_ms], path, line_no);
        d->n_sp++;
    }
    fclose(f);
    if (!d->n_sp) die("no attention rows in", path);
}

/* ------------------------------------------------------------------------ */
/* SVG helpers.                                                              */

/* Advance width of s at font size px. SVG cannot measure text, so labels are laid out
   from a table: DejaVu Sans's advances (the usual sans-serif on Linux, and wider than
   Helvetica or Arial), in hundredths of an em, rounded up, for ' ' to '~'. */
static double text_w(const char *s, double px) {
    static const unsigned char adv[95] = {
        32, 41, 46, 84, 64, 96, 78, 28, 40, 40, 50, 84, 32, 37, 32, 34, 64, 64, 64,
        64, 64, 64, 64, 64, 64, 64, 34, 34, 84, 84, 84, 54, 100, 69, 69, 70, 78, 64,
        58, 78, 76, 30, 30, 66, 56, 87, 75, 79, 61, 79, 70, 64, 62, 74, 69, 99, 69,
        62, 69, 40, 34, 40, 84, 50, 50, 62, 64, 55, 64, 62, 36, 64, 64, 28, 28, 58,
        28, 98, 64, 62, 64, 64, 42, 53, 40, 64, 60, 82, 60, 60, 53, 64, 34, 64, 84,
    };
    double em = 0.0;
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c >= 32 && c < 127) em += adv[c - 32] / 100.0;
        else if ((c & 0xC0) != 0x80) em += 1.0; /* one per UTF-8 character, at the widest */
    }
    return em * px;
}

static void xml_text(FILE *f, const char *s) {
    for (; *s; s++) {
        if (*s == '&') fputs("&amp;", f);
        else if (*s == '<') fputs("&lt;", f);
        else if (*s == '>') fputs("&gt;", f);
        else if ((unsigned char)*s >= 32) fputc(*s, f);
    }
}

/* <text> at (x, y) with extra attributes, its content escaped. */
static void text(FILE *f, double x, double y, const char *attrs, const char *s) {
    fprintf(f, "<text x=\"%.1f\" y=\"%.1f\"%s%s>", x, y, *attrs ? " " : "", attrs);
    xml_text(f, s);
    fprintf(f, "</text>\n");
}

/* Text at font size px in lines of at most max_w, broken at spaces, dy apart from the
   baseline y; returns the baseline of the last line. */
static double wrapped(FILE *f, double x, double y, double max_w, double dy, const char *attrs, double px,
                      const char *s) {
    char buf[512], *p = buf, *q, *cut;
    snprintf(buf, sizeof buf, "%s", s);
    while (text_w(p, px) > max_w) {
        /* the last space before which the line fits; the first one when no word does */
        for (cut = NULL, q = strchr(p, ' '); q; q = strchr(q + 1, ' ')) {
            int fits;
            *q = 0;
            fits = text_w(p, px) <= max_w;
            *q = ' ';
            if (!fits && cut) break;
            cut = q;
            if (!fits) break;
        }
        if (!cut) break; /* one word */
        *cut = 0;
        text(f, x, y, attrs, p);
        p = cut + 1;
        y += dy;
    }
    text(f, x, y, attrs, p);
    return y;
}

static void line(FILE *f, double x1, double y1, double x2, double y2, const char *attrs) {
    fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" %s/>\n", x1, y1, x2, y2, attrs);
}

static void fmt_tokens(int n, char *buf, size_t cap) {
    if (n >= 1024 && n % 1024 == 0) snprintf(buf, cap, "%dK", n / 1024);
    else snprintf(buf, cap, "%d", n);
}

/* Marker shapes: 0 filled circle (kvq), 1 open triangle (KIVI-2), 2 open square (q4_0). */
static void marker(FILE *f, int shape, double x, double y, const char *colour) {
    if (shape == 0)
        fprintf(f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"4\" fill=\"%s\"/>\n", x, y, colour);
    else if (shape == 1)
        fprintf(f, "<path d=\"M%.1f %.1fl5.5 9.5h-11z\" fill=\"#fff\" stroke=\"%s\" stroke-width=\"1.8\"/>\n", x,
                y - 6, colour);
    else
        fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"9\" height=\"9\" fill=\"#fff\" stroke=\"%s\" "
                   "stroke-width=\"1.8\"/>\n", x - 4.5, y - 4.5, colour);
}

/* Label placement: boxes already taken (markers, labels) and the series' line segments;
   a label goes to the first of eight spots around its point that meets none of them and
   stays inside the plot (else to the first spot). */
typedef struct placer {
    double b[MAX_BOXES][4]; /* x0, y0, x1, y1 */
    int n;
    double s[MAX_BOXES][4]; /* segments: x0, y0, x1, y1 */
    int n_s;
    double x0, y0, x1, y1;  /* the plot area */
} placer;

static void take_segment(placer *p, double x0, double y0, double x1, double y1) {
    if (p->n_s == MAX_BOXES) return;
    p->s[p->n_s][0] = x0;
    p->s[p->n_s][1] = y0;
    p->s[p->n_s][2] = x1;
    p->s[p->n_s][3] = y1;
    p->n_s++;
}

/* Whether the segment s meets the box x0..x1, y0..y1 (Liang-Barsky clipping). */
static int segment_meets(const double *s, double x0, double y0, double x1, double y1) {
    const double dx = s[2] - s[0], dy = s[3] - s[1];
    const double pk[4] = {-dx, dx, -dy, dy}, qk[4] = {s[0] - x0, x1 - s[0], s[1] - y0, y1 - s[1]};
    double t0 = 0.0, t1 = 1.0;
    int k;
    for (k = 0; k < 4; k++) {
        if (pk[k] == 0.0) {
            if (qk[k] < 0.0) return 0;
        } else {
            double t = qk[k] / pk[k];
            if (pk[k] < 0.0 && t > t0) t0 = t;
            if (pk[k] > 0.0 && t < t1) t1 = t;
        }
    }
    return t0 <= t1;
}

static void take(placer *p, double x0, double y0, double x1, double y1) {
    if (p->n == MAX_BOXES) return;
    p->b[p->n][0] = x0;
    p->b[p->n][1] = y0;
    p->b[p->n][2] = x1;
    p->b[p->n][3] = y1;
    p->n++;
}

/* How many taken boxes and segments the box x0..x1, y0..y1 meets; leaving the plot
   counts as many. */
static int clashes(const placer *p, double x0, double y0, double x1, double y1) {
    int i, n = 0;
    if (x0 < p->x0 + 2 || x1 > p->x1 - 2 || y0 < p->y0 + 2 || y1 > p->y1 - 2) n += 100;
    for (i = 0; i < p->n; i++)
        n += x0 < p->b[i][2] && p->b[i][0] < x1 && y0 < p->b[i][3] && p->b[i][1] < y1;
    for (i = 0; i < p->n_s; i++)
        n += segment_meets(p->s[i], x0 - 1, y0 - 1, x1 + 1, y1 + 1);
    return n;
}

/* Places a label of font size px next to the point (x, y) and writes it: the first of 16
   spots (8 around the point, then the same 8 further out) that meets nothing, else the
   one that meets the fewest. */
static void place_label(FILE *f, placer *p, double x, double y, double px, const char *colour, const char *s) {
    const double w = text_w(s, px), h = px;
    double bx = 0, by = 0;
    char attrs[64];
    int k, best = -1;
    for (k = 0; k < 16; k++) {
        /* left edge and baseline: right, left, above right, below right, above left,
           below left, above, below */
        const double o = k < 8 ? 0.0 : 9.0;
        const double sx[8] = {x + 7 + o, x - 7 - o - w, x + 4, x + 4, x - 4 - w, x - 4 - w, x - w / 2, x - w / 2};
        const double sy[8] = {y + h * 0.35, y + h * 0.35, y - 7 - o, y + 7 + o + h * 0.8, y - 7 - o,
                              y + 7 + o + h * 0.8, y - 8 - o, y + 8 + o + h * 0.8};
        int n = clashes(p, sx[k % 8], sy[k % 8] - h * 0.8, sx[k % 8] + w, sy[k % 8] + h * 0.2);
        if (best < 0 || n < best) {
            best = n;
            bx = sx[k % 8];
            by = sy[k % 8];
        }
        if (!n) break;
    }
    take(p, bx, by - h * 0.8, bx + w, by + h * 0.2);
    snprintf(attrs, sizeof attrs, "font-size=\"%.0f\" fill=\"%s\"", px, colour);
    text(f, bx, by, attrs, s);
}

/* Entries laid left to right, wrapping at x_max: where the next of width w goes. */
typedef struct flow {
    double x, y, x_start, x_max, row_h;
} flow;

static void flow_next(flow *fl, double w, double *x, double *y) {
    if (fl->x > fl->x_start && fl->x + w > fl->x_max) {
        fl->x = fl->x_start;
        fl->y += fl->row_h;
    }
    *x = fl->x;
    *y = fl->y;
    fl->x += w + 18;
}

/* ------------------------------------------------------------------------ */
/* Panel (a): attention error vs bits per element.                           */

static const char *const DUMP_COLOURS[MAX_DUMPS] = {"#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9"};

static const char *dump_label(const char *dump, char *buf, size_t cap) {
    if (!strncmp(dump, "stories260K", 11)) return "stories260K (Llama)";
    if (!strncmp(dump, "babyllama105", 12)) return "BabyLlama-105 (Llama)";
    if (!strncmp(dump, "minilm", 6)) return "MiniLM-L6 (BERT)";
    snprintf(buf, cap, "%.*s", (int)strcspn(dump, "."), dump); /* the file name without .kvd */
    return buf;
}

/* kNvN with N <= 8: K and V at N bits in KIVI's shape (k16v16 is the fp16 cache). */
static int ladder_config(const char *config) {
    int k = 0, v = 0, len = 0;
    return sscanf(config, "k%dv%d%n", &k, &v, &len) == 2 && config[len] == 0 && k == v && k <= 8;
}

static int cmp_bits(const void *a, const void *b) {
    const eval_pt *x = *(const eval_pt *const *)a, *y = *(const eval_pt *const *)b;
    return (x->bits > y->bits) - (x->bits < y->bits);
}

/* Draws panel (a) in the box from x0 (plot at L..R, T..B); returns the y below its legend. */
static double panel_accuracy(FILE *f, const data *d, double x0, double w, double T, double ph) {
    const double L = x0 + 62, R = x0 + w - 10, B = T + ph;
    const char *dumps[MAX_DUMPS];
    const eval_pt *pts[MAX_PTS];
    double xmin = 1e9, xmax = -1e9, ymin = 1e9, ymax = -1e9, v, lx, ly;
    int n_dumps = 0, i, j, n_pts;
    placer pl;
    flow fl;
    char buf[NAME_LEN];
    for (i = 0; i < d->n_ev; i++) {
        const eval_pt *p = &d->ev[i];
        const struct reference *r = ref_for(p->dump);
        if (!ladder_config(p->config)) continue;
        for (j = 0; j < n_dumps && strcmp(dumps[j], p->dump); j++) {}
        if (j == n_dumps) {
            if (n_dumps == MAX_DUMPS) continue;
            dumps[n_dumps++] = p->dump;
            if (r) {
                xmin = fmin(xmin, fmin(r->kivi_bits, r->q4_bits));
                xmax = fmax(xmax, fmax(r->kivi_bits, r->q4_bits));
                ymin = fmin(ymin, fmin(r->kivi_err, r->q4_err));
                ymax = fmax(ymax, fmax(r->kivi_err, r->q4_err));
            }
        }
        xmin = fmin(xmin, p->bits);
        xmax = fmax(xmax, p->bits);
        ymin = fmin(ymin, fmax(p->err, 1e-12));
        ymax = fmax(ymax, fmax(p->err, 1e-12));
    }
    if (!n_dumps) die("build/eval.csv has no kNvN configs (k2v2, k3v3, ...)", NULL);
    xmin = floor(xmin) - 0.5;
    xmax = ceil(xmax) + 0.5;
    ymin = floor(log10(ymin));
    ymax = ceil(log10(ymax));
    if (ymax <= ymin) ymax = ymin + 1;
#define SX(b) (L + ((b) - xmin) / (xmax - xmin) * (R - L))
#define SY(e) (T + (ymax - log10(fmax((e), 1e-12))) / (ymax - ymin) * ph)
    text(f, x0 + 10, T - 14, "font-size=\"14\" font-weight=\"bold\"", "(a) Accuracy against bits, real KV dumps");
    for (v = ymin; v <= ymax + 1e-9; v += 1.0) {
        char lab[16];
        line(f, L, SY(pow(10, v)), R, SY(pow(10, v)), "stroke=\"#ddd\"");
        snprintf(lab, sizeof lab, "1e%d", (int)v);
        text(f, L - 6, SY(pow(10, v)) + 4, "text-anchor=\"end\"", lab);
    }
    for (v = ceil(xmin); v <= xmax + 1e-9; v += 1.0) {
        char lab[16];
        line(f, SX(v), T, SX(v), B, "stroke=\"#eee\"");
        snprintf(lab, sizeof lab, "%g", v);
        text(f, SX(v), B + 16, "text-anchor=\"middle\"", lab);
    }
    fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" stroke=\"#000\"/>\n", L, T,
            R - L, ph);
    text(f, (L + R) / 2, B + 34, "text-anchor=\"middle\"",
         "bits per K/V element (steady state: codes + fp16 scale and min)");
    fprintf(f, "<text transform=\"translate(%.1f %.1f) rotate(-90)\" text-anchor=\"middle\">attention-output "
               "error (log scale)</text>\n", x0 + 16, T + ph / 2);
    memset(&pl, 0, sizeof pl);
    pl.x0 = L;
    pl.y0 = T;
    pl.x1 = R;
    pl.y1 = B;
    /* markers first (lines, kvq points, references), so that no label covers one */
    for (j = 0; j < n_dumps; j++) {
        const struct reference *r = ref_for(dumps[j]);
        for (i = 0, n_pts = 0; i < d->n_ev; i++)
            if (!strcmp(d->ev[i].dump, dumps[j]) && ladder_config(d->ev[i].config)) pts[n_pts++] = &d->ev[i];
        qsort(pts, (size_t)n_pts, sizeof pts[0], cmp_bits);
        fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\" points=\"", DUMP_COLOURS[j]);
        for (i = 0; i < n_pts; i++) fprintf(f, "%.1f,%.1f ", SX(pts[i]->bits), SY(pts[i]->err));
        fprintf(f, "\"/>\n");
        for (i = 0; i < n_pts; i++) {
            if (i) take_segment(&pl, SX(pts[i - 1]->bits), SY(pts[i - 1]->err), SX(pts[i]->bits), SY(pts[i]->err));
            marker(f, 0, SX(pts[i]->bits), SY(pts[i]->err), DUMP_COLOURS[j]);
            take(&pl, SX(pts[i]->bits) - 5, SY(pts[i]->err) - 5, SX(pts[i]->bits) + 5, SY(pts[i]->err) + 5);
        }
        if (r) {
            marker(f, 1, SX(r->kivi_bits), SY(r->kivi_err), DUMP_COLOURS[j]);
            marker(f, 2, SX(r->q4_bits), SY(r->q4_err), DUMP_COLOURS[j]);
            take(&pl, SX(r->kivi_bits) - 6, SY(r->kivi_err) - 7, SX(r->kivi_bits) + 6, SY(r->kivi_err) + 5);
            take(&pl, SX(r->q4_bits) - 6, SY(r->q4_err) - 6, SX(r->q4_bits) + 6, SY(r->q4_err) + 6);
        }
    }
    /* then labels: the references first (fewer, and the point of the comparison), then
       the kvq configs */
    for (j = 0; j < n_dumps; j++) {
        const struct reference *r = ref_for(dumps[j]);
        if (!r) continue;
        place_label(f, &pl, SX(r->kivi_bits), SY(r->kivi_err), 10, DUMP_COLOURS[j], "KIVI-2");
        place_label(f, &pl, SX(r->q4_bits), SY(r->q4_err), 10, DUMP_COLOURS[j], "q4_0");
    }
    for (j = 0; j < n_dumps; j++)
        for (i = 0; i < d->n_ev; i++)
            if (!strcmp(d->ev[i].dump, dumps[j]) && ladder_config(d->ev[i].config))
                place_label(f, &pl, SX(d->ev[i].bits), SY(d->ev[i].err), 10, DUMP_COLOURS[j], d->ev[i].config);
#undef SX
#undef SY
    /* legend: the dumps, then the marker shapes */
    fl.x = fl.x_start = L;
    fl.y = B + 58;
    fl.x_max = R;
    fl.row_h = 18;
    for (j = 0; j < n_dumps; j++) {
        const char *name = dump_label(dumps[j], buf, sizeof buf);
        flow_next(&fl, 26 + text_w(name, 12), &lx, &ly);
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"2\"/>\n", lx,
                ly - 4, lx + 20, ly - 4, DUMP_COLOURS[j]);
        marker(f, 0, lx + 10, ly - 4, DUMP_COLOURS[j]);
        text(f, lx + 26, ly, "", name);
    }
    fl.x = fl.x_max; /* a new row */
    {
        static const char *const shapes[3] = {"kvq kNvN (K and V at N bits)", "KIVI-2", "llama.cpp q4_0"};
        for (i = 0; i < 3; i++) {
            flow_next(&fl, 18 + text_w(shapes[i], 12), &lx, &ly);
            marker(f, i, lx + 6, ly - 4, "#444");
            text(f, lx + 18, ly, "", shapes[i]);
        }
    }
    text(f, L, fl.y + 18, "fill=\"#555\" font-size=\"11\"",
         "error: mean ||o - o_exact||^2 / ||o_exact||^2 over every query of the dump");
    text(f, L, fl.y + 34, "fill=\"#555\" font-size=\"11\"",
         "KIVI-2, q4_0: figures from the dumps' REFERENCE.md (same protocol)");
    return fl.y + 34;
}

/* ------------------------------------------------------------------------ */
/* Panel (b): speed-up over kvq fp16 against context length.                 */

/* bench.c's colours for its configs (CFGS), so that both charts agree. */
static const char *config_colour(const char *name, int i) {
    static const char *const tab[][2] = {
        {"fp32", "#444444"},     {"kvq-16", "#d62728"},  {"kvq-8", "#ff7f0e"},    {"kvq-4", "#2ca02c"},
        {"kvq-3", "#1f77b4"},    {"kvq-2", "#9467bd"},   {"kvq-2x5", "#8c564b"},  {"kvq-2x10", "#e377c2"},
        {"kvq-2h", "#17becf"},   {"kvq-2t", "#bcbd22"},  {"kvq-2c0", "#7f7f7f"},  {"kvq-2p32", "#aec7e8"},
        {"kvq-2p16", "#c5b0d5"}, {"kvq-k3v2", "#393b79"},
    };
    static const char *const others[] = {"#8c6d31", "#637939", "#843c39", "#7b4173", "#3182bd", "#e6550d"};
    size_t k;
    for (k = 0; k < sizeof tab / sizeof tab[0]; k++)
        if (!strcmp(name, tab[k][0])) return tab[k][1];
    return others[i % 6];
}

static const char *config_label(const char *name, char *buf, size_t cap) {
    int b = 0, len = 0;
    if (!strcmp(name, "fp32")) return "fp32 (hand-written)";
    if (!strcmp(name, "kvq-16")) return "kvq fp16";
    if (sscanf(name, "kvq-%d%n", &b, &len) == 1 && name[len] == 0) {
        snprintf(buf, cap, "kvq %d-bit", b);
        return buf;
    }
    return name;
}

static const speed_pt *find_speed(const data *d, const char *config, int nq, int thr, int n) {
    int i;
    for (i = 0; i < d->n_sp; i++)
        if (d->sp[i].nq == nq && d->sp[i].threads == thr && d->sp[i].n == n && !strcmp(d->sp[i].config, config))
            return &d->sp[i];
    return NULL;
}

static int cmp_int(const void *a, const void *b) { return (*(const int *)a > *(const int *)b) - (*(const int *)a < *(const int *)b); }

typedef struct end_label {
    double y;
    char text[96];
    const char *colour;
} end_label;

static int cmp_end(const void *a, const void *b) {
    double x = ((const end_label *)a)->y, y = ((const end_label *)b)->y;
    return (x > y) - (x < y);
}

/* Draws panel (b) in the box from x0; configs: comma list. Returns the y below its notes. */
static double panel_speed(FILE *f, const data *d, const char *configs, double x0, double w, double T, double ph) {
    const double B = T + ph;
    char names[MAX_CFGS][NAME_LEN], buf[NAME_LEN], note[256];
    int ns[64], n_ns = 0, n_names = 0, nq = d->sp[0].nq, thr = d->sp[0].threads, i, k, c;
    double top = 1.0, step, v, lw = 0, L = x0 + 56, R, lx0, lx1;
    end_label ends[MAX_CFGS + 1];
    int n_ends = 0;
    const char *p = configs;
    for (i = 0; i < d->n_sp; i++) if (d->sp[i].nq == 32) nq = 32;
    for (i = 0; i < d->n_sp; i++) if (d->sp[i].nq == nq && d->sp[i].threads < thr) thr = d->sp[i].threads;
    for (i = 0; i < d->n_sp; i++) {
        if (d->sp[i].nq != nq || d->sp[i].threads != thr || !find_speed(d, "kvq-16", nq, thr, d->sp[i].n)) continue;
        for (k = 0; k < n_ns && ns[k] != d->sp[i].n; k++) {}
        if (k == n_ns && n_ns < 64) ns[n_ns++] = d->sp[i].n;
    }
    if (!n_ns) die("bench CSV has no kvq-16 rows (the fp16 baseline): run bench with --configs 16,...", NULL);
    qsort(ns, (size_t)n_ns, sizeof ns[0], cmp_int);
    /* the configs to draw: those of the list with a row at some N */
    while (*p && n_names < MAX_CFGS) {
        size_t len = strcspn(p, ",");
        snprintf(names[n_names], NAME_LEN, "%.*s", (int)len, p);
        p += len + (p[len] == ',');
        for (k = 0; k < n_ns && !find_speed(d, names[n_names], nq, thr, ns[k]); k++) {}
        if (k < n_ns && strcmp(names[n_names], "kvq-16")) n_names++;
    }
    /* speed-up range and the widest end label ("kvq 2-bit 1.57x") */
    for (c = 0; c <= n_names; c++) {
        const char *name = c < n_names ? names[c] : "kvq-16";
        const speed_pt *last = NULL;
        for (k = 0; k < n_ns; k++) {
            const speed_pt *s = find_speed(d, name, nq, thr, ns[k]), *b = find_speed(d, "kvq-16", nq, thr, ns[k]);
            if (!s) continue;
            top = fmax(top, b->ms / s->ms);
            last = s;
        }
        snprintf(ends[n_ends].text, sizeof ends[n_ends].text, "%s %.2fx", config_label(name, buf, sizeof buf),
                 find_speed(d, "kvq-16", nq, thr, last->n)->ms / last->ms);
        ends[n_ends].colour = config_colour(name, c);
        lw = fmax(lw, text_w(ends[n_ends].text, 11));
        n_ends++;
    }
    R = x0 + w - lw - 16;
    step = top > 3.0 ? 1.0 : top > 1.5 ? 0.5 : 0.25;
    top = ceil(top * 1.08 / step) * step;
    lx0 = log2(ns[0]) - 0.35;
    lx1 = log2(ns[n_ns - 1]) + 0.35;
#define SX(n) (L + (log2(n) - lx0) / (lx1 - lx0) * (R - L))
#define SY(s) (B - (s) / top * ph)
    text(f, x0 + 10, T - 14, "font-size=\"14\" font-weight=\"bold\"", "(b) Decode speed-up over kvq fp16");
    for (v = 0.0; v <= top + 1e-9; v += step) {
        char lab[16];
        line(f, L, SY(v), R, SY(v), "stroke=\"#ddd\"");
        snprintf(lab, sizeof lab, "%.*fx", step < 0.5 ? 2 : 1, v);
        text(f, L - 6, SY(v) + 4, "text-anchor=\"end\"", lab);
    }
    for (k = (int)ceil(lx0); k <= (int)floor(lx1); k++) {
        fmt_tokens(1 << k, buf, sizeof buf);
        line(f, SX(1 << k), T, SX(1 << k), B, "stroke=\"#eee\"");
        text(f, SX(1 << k), B + 16, "text-anchor=\"middle\"", buf);
    }
    fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" stroke=\"#000\"/>\n", L, T,
            R - L, ph);
    text(f, (L + R) / 2, B + 34, "text-anchor=\"middle\"", "context length N (tokens, log scale)");
    fprintf(f, "<text transform=\"translate(%.1f %.1f) rotate(-90)\" text-anchor=\"middle\">kvq fp16 time / "
               "time (higher is faster)</text>\n", x0 + 14, T + ph / 2);
    /* fp16 at 1.0x, dashed, then a line with markers per config */
    fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"1.5\" "
               "stroke-dasharray=\"6 4\"/>\n", SX(ns[0]), SY(1.0), SX(ns[n_ns - 1]), SY(1.0),
            config_colour("kvq-16", 0));
    ends[n_names].y = SY(1.0);
    for (c = 0; c < n_names; c++) {
        const char *col = config_colour(names[c], c);
        fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\" points=\"", col);
        for (k = 0; k < n_ns; k++) {
            const speed_pt *s = find_speed(d, names[c], nq, thr, ns[k]), *b = find_speed(d, "kvq-16", nq, thr, ns[k]);
            if (s) fprintf(f, "%.1f,%.1f ", SX(ns[k]), SY(b->ms / s->ms));
        }
        fprintf(f, "\"/>\n");
        for (k = 0; k < n_ns; k++) {
            const speed_pt *s = find_speed(d, names[c], nq, thr, ns[k]), *b = find_speed(d, "kvq-16", nq, thr, ns[k]);
            if (!s) continue;
            marker(f, 0, SX(ns[k]), SY(b->ms / s->ms), col);
            ends[c].y = SY(b->ms / s->ms);
        }
    }
    /* end labels right of the plot, in the lines' order, pushed apart to 13 px */
    qsort(ends, (size_t)n_ends, sizeof ends[0], cmp_end);
    for (k = 1; k < n_ends; k++) ends[k].y = fmax(ends[k].y, ends[k - 1].y + 13);
    if (n_ends && ends[n_ends - 1].y > B) ends[n_ends - 1].y = B;
    for (k = n_ends - 2; k >= 0; k--) ends[k].y = fmin(ends[k].y, ends[k + 1].y - 13);
    for (k = 0; k < n_ends; k++) {
        char attrs[64];
        snprintf(attrs, sizeof attrs, "font-size=\"11\" fill=\"%s\"", ends[k].colour);
        text(f, R + 6, ends[k].y + 4, attrs, ends[k].text);
    }
#undef SX
#undef SY
    snprintf(note, sizeof note, "decode attention, 1 query, %s, head_dim 128, %d thread%s",
             nq == 32 ? "GQA 32/8" : nq == 8 ? "MHA 8/8" : "(query heads?)", thr, thr == 1 ? "" : "s");
    text(f, L, B + 58, "fill=\"#555\" font-size=\"11\"", note);
    snprintf(note, sizeof note, "kvq fp16 median:");
    for (k = 0; k < n_ns; k++) {
        size_t len = strlen(note);
        fmt_tokens(ns[k], buf, sizeof buf);
        snprintf(note + len, sizeof note - len, "%s %.3g ms at %s", k ? "," : "",
                 find_speed(d, "kvq-16", nq, thr, ns[k])->ms, buf);
    }
    text(f, L, B + 74, "fill=\"#555\" font-size=\"11\"", note);
    return B + 74;
}

/* ------------------------------------------------------------------------ */

static void usage(void) {
    fprintf(stderr, "usage: overview [--cpu TEXT] [--date TEXT] [--note TEXT] [--configs LIST] EVAL.csv BENCH.csv "
                    "OUT.svg\n");
    exit(2);
}

int main(int argc, char **argv) {
    static data d;
    const char *paths[3], *cpu = NULL, *date = NULL, *note = NULL, *configs = "fp32,kvq-8,kvq-4,kvq-3,kvq-2";
    const double W = 1060, ph = 330;
    char src[512];
    double T, ya, yb, H;
    int n_paths = 0, i, ch;
    FILE *body, *out;
    for (i = 1; i < argc; i++) {
        const char **opt = !strcmp(argv[i], "--cpu") ? &cpu : !strcmp(argv[i], "--date") ? &date
                         : !strcmp(argv[i], "--note") ? &note : !strcmp(argv[i], "--configs") ? &configs : NULL;
        if (opt && i + 1 < argc) *opt = argv[++i];
        else if (opt || argv[i][0] == '-' || n_paths == 3) usage();
        else paths[n_paths++] = argv[i];
    }
    if (n_paths != 3) usage();
    read_eval(&d, paths[0]);
    read_bench(&d, paths[1]);
    if (cpu) snprintf(d.cpu, sizeof d.cpu, "%s", cpu);
    if (date) snprintf(d.date, sizeof d.date, "%s", date);
    if (!d.cpu[0]) snprintf(d.cpu, sizeof d.cpu, "CPU not recorded (--cpu)");
    if (!d.date[0]) snprintf(d.date, sizeof d.date, "date not recorded (--date)");

    /* the body first, into a temporary file: the height is known once it is drawn */
    body = tmpfile();
    if (!body) die("cannot create a temporary file", NULL);
    text(body, 14, 28, "font-size=\"17\" font-weight=\"bold\"",
         "kvq: 2-bit KV cache, attention on the packed codes");
    snprintf(src, sizeof src, "(a) %s (make eval), written %s", paths[0], d.eval_date);
    text(body, 14, 50, "fill=\"#555\"", src);
    snprintf(src, sizeof src, "(b) %s (build/bench): %s, measured %s%s%s", paths[1], d.cpu, d.date,
             d.kvq[0] ? ", kvq " : "", d.kvq);
    text(body, 14, 66, "fill=\"#555\"", src);
    T = note ? wrapped(body, 14, 84, W - 28, 16, "fill=\"#b00\"", 12, note) + 44 : 128;
    ya = panel_accuracy(body, &d, 0, 520, T, ph);
    yb = panel_speed(body, &d, configs, 530, W - 530, T, ph);
    H = ceil(fmax(ya, yb) + 14);

    out = fopen(paths[2], "w");
    if (!out) die("cannot create", paths[2]);
    fprintf(out, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" "
                 "font-family=\"sans-serif\" font-size=\"12\">\n", W, H, W, H);
    fprintf(out, "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n");
    rewind(body);
    while ((ch = getc(body)) != EOF) putc(ch, out);
    fclose(body);
    fprintf(out, "</svg>\n");
    if (fclose(out) != 0) die("write failed", paths[2]);
    return 0;
}
