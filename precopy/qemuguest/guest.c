/* precopy QEMU test guest: fills its RAM, keeps dirtying it, checks itself.
 *
 * Layout (physical = offset in the RAM file of a pc machine, below 3 GiB):
 *   1 MiB   this kernel
 *   4 MiB   ver[]: the version of every page (uint32 per 4 KiB page)
 *   8 MiB.. data pages up to the top of RAM
 * Word i of data page p at version v is H(p, v) ^ (i * 0x01000193).
 *
 * The main loop writes pages (a new version of a random page of the hot
 * set) at `rate` pages per second of PIT time and, in between, verifies
 * pages round robin against ver[].  A page whose content does not match
 * its recorded version (a stale page after a migration) is counted as bad
 * and reported on the serial port.
 *
 * Kernel command line (-append): rate=PAGES_PER_S (0: as fast as it can),
 * hot=PAGES (the pages written; 0: all data pages).
 * Serial lines: "precopy-guest start ...", "precopy-guest ready ...",
 * then every 0.25 s "precopy-guest tick=T writes=W sweeps=S bad=B".
 */
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long s64;

#define PAGE_WORDS 1024u
#define VER_BASE   0x400000u
#define DATA_BASE  0x800000u
#define PIT_HZ     1193182
#define PRINT_TICKS (PIT_HZ / 4)

static inline void outb(unsigned short port, unsigned char v) {
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}
static inline unsigned char inb(unsigned short port) {
    unsigned char v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static void putc_serial(char c) {
    while (!(inb(0x3FD) & 0x20)) { }
    outb(0x3F8, (unsigned char)c);
}
static void puts_serial(const char *s) { while (*s) putc_serial(*s++); }
static void putu(u64 v) {
    char buf[24];
    int n = 0;
    do { buf[n++] = (char)('0' + (int)(v % 10u)); v /= 10u; } while (v && n < 20);
    while (n) putc_serial(buf[--n]);
}

/* u64 % and / by 10 above need libgcc; keep putu honest with our own. */
u64 __udivdi3(u64 n, u64 d);
u64 __umoddi3(u64 n, u64 d);
static u64 udivmod(u64 n, u64 d, u64 *rem) {
    u64 q = 0, r = 0;
    for (int i = 63; i >= 0; i--) {
        r = (r << 1) | ((n >> i) & 1u);
        if (r >= d) { r -= d; q |= (u64)1 << i; }
    }
    if (rem) *rem = r;
    return q;
}
u64 __udivdi3(u64 n, u64 d) { return udivmod(n, d, 0); }
u64 __umoddi3(u64 n, u64 d) { u64 r; udivmod(n, d, &r); return r; }

static void serial_init(void) {
    outb(0x3F9, 0x00); outb(0x3FB, 0x80); outb(0x3F8, 0x01); outb(0x3F9, 0x00);
    outb(0x3FB, 0x03); outb(0x3FA, 0xC7); outb(0x3FC, 0x0B);
}

/* PIT channel 0, mode 2, reload 65536: read by latching, never by IRQ. */
static u32 pit_last;
static void pit_init(void) {
    outb(0x43, 0x34); outb(0x40, 0); outb(0x40, 0);
    pit_last = 0;
}
static u32 pit_read(void) {
    outb(0x43, 0x00);
    u32 lo = inb(0x40), hi = inb(0x40);
    return (hi << 8) | lo;
}
/* Ticks since the last call (the counter counts down and wraps). */
static u32 pit_delta(void) {
    u32 now = pit_read();
    u32 d = (pit_last - now) & 0xFFFFu;
    pit_last = now;
    return d;
}

static inline u32 H(u32 p, u32 v) { return (p * 2654435761u) ^ (v * 40503u + 0x9E3779B9u); }

static u32 parse_u32(const char *s, const char *key, u32 dflt) {
    for (; s && *s; s++) {
        const char *a = s, *k = key;
        while (*k && *a == *k) { a++; k++; }
        if (!*k) {
            u32 v = 0;
            while (*a >= '0' && *a <= '9') v = v * 10u + (u32)(*a++ - '0');
            return v;
        }
    }
    return dflt;
}

static u32 rng = 2463534242u;
static inline u32 xorshift(void) { rng ^= rng << 13; rng ^= rng >> 17; rng ^= rng << 5; return rng; }

static void write_page(u32 p, u32 v) {
    volatile u32 *w = (volatile u32 *)(p * 4096u);
    u32 h = H(p, v);
    for (u32 i = 0; i < PAGE_WORDS; i++) w[i] = h ^ (i * 0x01000193u);
}
static int check_page(u32 p, u32 v, u32 *word, u32 *got) {
    volatile u32 *w = (volatile u32 *)(p * 4096u);
    u32 h = H(p, v);
    for (u32 i = 0; i < PAGE_WORDS; i++) {
        if (w[i] != (h ^ (i * 0x01000193u))) { *word = i; *got = w[i]; return 0; }
    }
    return 1;
}

void guest_main(u32 magic, u32 *info) {
    serial_init();
    if (magic != 0x2BADB002u || !(info[0] & 1u)) {
        puts_serial("precopy-guest error: not booted by multiboot with memory info\n");
        return;
    }
    const char *cmdline = (info[0] & 4u) ? (const char *)info[4] : "";
    u32 top = 0x100000u + info[2] * 1024u;           /* mem_upper: KiB above 1 MiB */
    if (top > 0xC0000000u) top = 0xC0000000u;
    u32 first = DATA_BASE / 4096u, end = top / 4096u;
    u32 rate = parse_u32(cmdline, "rate=", 0);
    u32 hot = parse_u32(cmdline, "hot=", 0);
    if (hot == 0 || hot > end - first) hot = end - first;
    volatile u32 *ver = (volatile u32 *)VER_BASE;

    puts_serial("precopy-guest start mem_mib="); putu(top >> 20);
    puts_serial(" pages="); putu(end - first);
    puts_serial(" hot="); putu(hot);
    puts_serial(" rate="); putu(rate); putc_serial('\n');

    for (u32 p = first; p < end; p++) { ver[p] = 1; write_page(p, 1); }
    puts_serial("precopy-guest ready\n");

    pit_init();
    u64 writes = 0, sweeps = 0, bad = 0, ticks = 0;
    s64 credit = 0, cap = (s64)rate * (PIT_HZ / 10);
    u32 since_print = 0, cursor = first;
    for (;;) {
        u32 d = pit_delta();
        ticks += d;
        since_print += d;
        credit += (s64)d * rate;
        if (credit > cap) credit = cap;
        if (rate == 0 || credit >= PIT_HZ) {
            u32 p = first + xorshift() % hot;
            u32 v = ver[p] + 1;
            write_page(p, v);      /* the page first, then its version: */
            ver[p] = v;            /* a stale ver[] would flag a good page */
            writes++;
            credit -= PIT_HZ;
        } else {
            u32 word, got;
            if (!check_page(cursor, ver[cursor], &word, &got)) {
                bad++;
                if (bad <= 8) {
                    puts_serial("precopy-guest BAD page="); putu(cursor);
                    puts_serial(" ver="); putu(ver[cursor]);
                    puts_serial(" word="); putu(word);
                    puts_serial(" got="); putu(got); putc_serial('\n');
                }
            }
            if (++cursor == end) { cursor = first; sweeps++; }
        }
        if (since_print >= PRINT_TICKS) {
            since_print -= PRINT_TICKS;
            puts_serial("precopy-guest tick="); putu(ticks / PRINT_TICKS);
            puts_serial(" writes="); putu(writes);
            puts_serial(" sweeps="); putu(sweeps);
            puts_serial(" bad="); putu(bad); putc_serial('\n');
        }
    }
}
