//! Charts — lines, expert-load heat maps, stacked bars and timelines — described as plain
//! data and drawn by one code path onto either a PNG bitmap or an SVG document.
//!
//! Every chart has a title, axis titles with units and a legend or a labelled colour
//! scale: a picture must say what it shows without the terminal beside it.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;
use ultramoe_config::{Error, Result};

/// An image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// 8-bit RGB PNG
    Png,
    /// SVG with text as text (searchable, scalable)
    Svg,
}

impl Format {
    /// `png` or `svg`.
    pub fn parse(s: &str) -> Result<Format> {
        match s.to_ascii_lowercase().as_str() {
            "png" => Ok(Format::Png),
            "svg" => Ok(Format::Svg),
            _ => Err(Error::field("--format", format!("`{s}`: expected png or svg"))),
        }
    }

    /// The file extension.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Png => "png",
            Format::Svg => "svg",
        }
    }

    /// The format a file name asks for: `.svg` is SVG, anything else PNG.
    pub fn of_path(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("svg") => Format::Svg,
            _ => Format::Png,
        }
    }
}

/// The font family every chart uses (registered from embedded bytes on first use).
const FONT: &str = "sans-serif";

fn register_fonts() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        [FontStyle::Normal, FontStyle::Bold]
            .into_iter()
            .all(|style| plotters::style::register_font(FONT, style, epaint_default_fonts::UBUNTU_LIGHT).is_ok())
    });
    if ok {
        Ok(())
    } else {
        Err(Error::msg("the embedded chart font could not be read"))
    }
}

/// Ten colours told apart by most readers (Tableau 10).
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(78, 121, 167),
    RGBColor(242, 142, 43),
    RGBColor(225, 87, 89),
    RGBColor(118, 183, 178),
    RGBColor(89, 161, 79),
    RGBColor(237, 201, 72),
    RGBColor(176, 122, 161),
    RGBColor(255, 157, 167),
    RGBColor(156, 117, 95),
    RGBColor(186, 176, 172),
];

/// One named line of a line chart.
#[derive(Clone, Debug)]
pub struct Series {
    /// legend entry
    pub name: String,
    /// (x, y) points; non-finite ones are left out
    pub points: Vec<(f64, f64)>,
}

/// Lines against a common x axis.
#[derive(Clone, Debug)]
pub struct Lines {
    /// chart title
    pub title: String,
    /// x axis title, with its unit
    pub x_label: String,
    /// y axis title, with its unit
    pub y_label: String,
    /// the lines
    pub series: Vec<Series>,
}

/// One panel of a heat map (one MoE layer).
#[derive(Clone, Debug)]
pub struct HeatPanel {
    /// panel title
    pub title: String,
    /// `cells[column][row]`: the value shown by the colour scale
    pub cells: Vec<Vec<f64>>,
}

/// Panels of cells over a shared x range, with one labelled colour scale.
#[derive(Clone, Debug)]
pub struct HeatMap {
    /// chart title
    pub title: String,
    /// x axis title (columns)
    pub x_label: String,
    /// y axis title (rows)
    pub y_label: String,
    /// the x value at the left edge of the first column and the right edge of the last
    pub x_range: (f64, f64),
    /// one panel each
    pub panels: Vec<HeatPanel>,
    /// what a cell's colour means
    pub scale_label: String,
}

/// Stacked bars, one per item, each split into named parts.
#[derive(Clone, Debug)]
pub struct Bars {
    /// chart title
    pub title: String,
    /// y axis title, with its unit
    pub y_label: String,
    /// lines written under each bar
    pub labels: Vec<Vec<String>>,
    /// legend entries, one per part
    pub parts: Vec<String>,
    /// `values[bar][part]`
    pub values: Vec<Vec<f64>>,
}

/// One interval of a timeline.
#[derive(Clone, Debug)]
pub struct Span {
    /// row (0: top)
    pub row: usize,
    /// start, in x units
    pub start: f64,
    /// end, in x units
    pub end: f64,
    /// index into the timeline's kinds
    pub kind: usize,
    /// written inside the span where it fits
    pub text: String,
}

/// Intervals on named rows against time.
#[derive(Clone, Debug)]
pub struct Timeline {
    /// chart title
    pub title: String,
    /// x axis title, with its unit
    pub x_label: String,
    /// row names, top to bottom
    pub rows: Vec<String>,
    /// legend entries with their colours
    pub kinds: Vec<(String, RGBColor)>,
    /// the intervals, drawn in order (later ones on top)
    pub spans: Vec<Span>,
}

/// A chart of any kind.
#[derive(Clone, Debug)]
pub enum Chart {
    /// line chart
    Lines(Lines),
    /// heat map
    Heat(HeatMap),
    /// stacked bars
    Bars(Bars),
    /// timeline
    Timeline(Timeline),
}

type Drawn = std::result::Result<(), Box<dyn std::error::Error>>;

/// The diverging colour of a load ratio (load / mean load): 0 → dark blue, 1 → white,
/// ≥ 2 → dark red (linear between).
pub fn diverging(ratio: f64) -> RGBColor {
    let t = (ratio / 2.0).clamp(0.0, 1.0);
    let (lo, mid, hi) = ([33.0, 64.0, 154.0], [247.0, 247.0, 247.0], [178.0, 24.0, 43.0]);
    let (a, b, u) = if t < 0.5 { (lo, mid, t * 2.0) } else { (mid, hi, (t - 0.5) * 2.0) };
    let c = |i: usize| (a[i] + (b[i] - a[i]) * u).round() as u8;
    RGBColor(c(0), c(1), c(2))
}

/// The largest value the heat maps' colour scale shows apart (2 × the mean).
const SCALE_MAX: f64 = 2.0;

/// A tick label: as few digits as the value needs.
fn tick(v: f64) -> String {
    let a = v.abs();
    let s = if a == 0.0 {
        return "0".into();
    } else if a >= 1e6 {
        return format!("{:.2e}", v);
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a >= 1e-4 {
        format!("{v:.6}")
    } else {
        return format!("{v:.1e}");
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// `lo..hi` widened to show a flat series, with 5% headroom above.
fn axis(lo: f64, hi: f64) -> std::ops::Range<f64> {
    if !(lo.is_finite() && hi.is_finite()) {
        return 0.0..1.0;
    }
    if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return lo - pad..hi + pad;
    }
    lo..hi + 0.05 * (hi - lo)
}

fn text_style(size: u32, h: HPos, v: VPos) -> TextStyle<'static> {
    TextStyle::from((FONT, size).into_font()).pos(Pos::new(h, v))
}

/// A row of legend entries (a colour square and its name) along an area's top.
fn legend_strip<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, entries: &[(String, RGBColor)]) -> Drawn
where
    DB::ErrorType: 'static,
{
    let (w, _) = area.dim_in_pixel();
    let (mut x, mut y) = (70i32, 6i32);
    for (name, colour) in entries {
        let width = 26 + 7 * name.chars().count() as i32;
        if x + width > w as i32 - 10 {
            (x, y) = (70, y + 20);
        }
        area.draw(&Rectangle::new([(x, y + 2), (x + 12, y + 14)], colour.filled()))?;
        area.draw(&Text::new(name.clone(), (x + 17, y + 8), text_style(13, HPos::Left, VPos::Center)))?;
        x += width;
    }
    Ok(())
}

/// Rows the legend strip needs for `entries` on an area `width` pixels wide.
fn legend_rows(entries: &[(String, RGBColor)], width: u32) -> u32 {
    let (mut x, mut rows) = (70i32, 1u32);
    for (name, _) in entries {
        let w = 26 + 7 * name.chars().count() as i32;
        if x + w > width as i32 - 10 {
            (x, rows) = (70, rows + 1);
        }
        x += w;
    }
    rows
}

impl Chart {
    /// The chart's title.
    pub fn title(&self) -> &str {
        match self {
            Chart::Lines(c) => &c.title,
            Chart::Heat(c) => &c.title,
            Chart::Bars(c) => &c.title,
            Chart::Timeline(c) => &c.title,
        }
    }

    /// Width and height in pixels (an SVG's view box).
    pub fn size(&self) -> (u32, u32) {
        match self {
            Chart::Lines(_) => (820, 460),
            Chart::Heat(h) => {
                let rows = h.panels.first().and_then(|p| p.cells.first()).map_or(1, |c| c.len()) as u32;
                let panel = (rows * 12).clamp(90, 240) + 40;
                (960, 60 + 40 + panel * h.panels.len().max(1) as u32)
            }
            Chart::Bars(b) => {
                let w = (160 + 124 * b.values.len() as u32).max(760);
                let lines = b.labels.iter().map(|l| l.len()).max().unwrap_or(0) as u32;
                (w, 440 + 16 * lines)
            }
            Chart::Timeline(t) => (1100, (150 + 40 * t.rows.len() as u32).max(240)),
        }
    }

    /// The image file's bytes.
    pub fn render(&self, format: Format) -> Result<Vec<u8>> {
        register_fonts()?;
        let (w, h) = self.size();
        let failed = |e: Box<dyn std::error::Error>| Error::msg(format!("drawing the chart `{}` failed: {e}", self.title()));
        match format {
            Format::Png => {
                let mut rgb = vec![255u8; (w * h * 3) as usize];
                {
                    let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
                    self.draw(&root).map_err(failed)?;
                    root.present().map_err(|e| failed(e.into()))?;
                }
                let mut out = Vec::new();
                let mut enc = png::Encoder::new(&mut out, w, h);
                enc.set_color(png::ColorType::Rgb);
                enc.set_depth(png::BitDepth::Eight);
                enc.set_compression(png::Compression::Best);
                let mut writer = enc.write_header().map_err(|e| failed(e.into()))?;
                writer.write_image_data(&rgb).map_err(|e| failed(e.into()))?;
                writer.finish().map_err(|e| failed(e.into()))?;
                Ok(out)
            }
            Format::Svg => {
                let mut svg = String::new();
                {
                    let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
                    self.draw(&root).map_err(failed)?;
                    root.present().map_err(|e| failed(e.into()))?;
                }
                Ok(svg.into_bytes())
            }
        }
    }

    /// Writes the chart to `path`.
    pub fn save(&self, path: &Path, format: Format) -> Result<()> {
        let bytes = self.render(format)?;
        std::fs::write(path, bytes).map_err(|e| Error::msg(format!("cannot write: {e}")).in_file(path))
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Drawn
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        match self {
            Chart::Lines(c) => draw_lines(root, c),
            Chart::Heat(c) => draw_heat(root, c),
            Chart::Bars(c) => draw_bars(root, c),
            Chart::Timeline(c) => draw_timeline(root, c),
        }
    }
}

fn draw_lines<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, c: &Lines) -> Drawn
where
    DB::ErrorType: 'static,
{
    let finite = || c.series.iter().flat_map(|s| s.points.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
    let (x0, x1) = finite().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = finite().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
    // Quantities that start at zero (throughput, memory, seconds) show their zero.
    let y0 = if y0 >= 0.0 && y0 < 0.5 * y1 { 0.0 } else { y0 };
    let xs = if x0.is_finite() && x1 > x0 { x0..x1 } else { axis(x0, x1) };
    let mut chart = ChartBuilder::on(root)
        .caption(&c.title, (FONT, 22))
        .margin(14)
        .x_label_area_size(46)
        .y_label_area_size(78)
        .build_cartesian_2d(xs, {
            // room above the lines for the legend
            let r = axis(y0, y1);
            r.start..r.end + 0.15 * (r.end - r.start)
        })?;
    chart
        .configure_mesh()
        .x_desc(&c.x_label)
        .y_desc(&c.y_label)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 15))
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .light_line_style(RGBColor(240, 240, 240))
        .draw()?;
    for (i, s) in c.series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let pts: Vec<(f64, f64)> = s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
        let line = if pts.len() == 1 {
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, colour.filled())))?
        } else {
            chart.draw_series(LineSeries::new(pts, colour.stroke_width(2)))?
        };
        line.label(s.name.clone()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], colour.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(160, 160, 160))
        .label_font((FONT, 13))
        .draw()?;
    Ok(())
}

fn draw_heat<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, h: &HeatMap) -> Drawn
where
    DB::ErrorType: 'static,
{
    let (w, _) = root.dim_in_pixel();
    let body = root.titled(&h.title, (FONT, 22))?;
    let (panels_area, scale_area) = body.split_horizontally(w - 150);
    let (x0, x1) = h.x_range;
    let n = h.panels.len().max(1);
    for (i, (panel, area)) in h.panels.iter().zip(panels_area.split_evenly((n, 1))).enumerate() {
        let last = i + 1 == n;
        let rows = panel.cells.first().map_or(0, |c| c.len()).max(1);
        let mut chart = ChartBuilder::on(&area)
            .caption(&panel.title, (FONT, 15))
            .margin(6)
            .margin_right(12)
            .x_label_area_size(if last { 44 } else { 22 })
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1.max(x0 + 1.0), -0.5f64..rows as f64 - 0.5)?;
        let mut mesh = chart.configure_mesh();
        mesh.disable_mesh().y_desc(&h.y_label).label_style((FONT, 12)).axis_desc_style((FONT, 14)).x_label_formatter(&|v| tick(*v));
        // Row r spans r ± ½, so integer ticks name the rows.
        mesh.y_labels(rows.min(9)).y_label_formatter(&|v| if v.fract() == 0.0 { format!("{v:.0}") } else { String::new() });
        if last {
            mesh.x_desc(&h.x_label);
        }
        mesh.draw()?;
        let cols = panel.cells.len().max(1);
        let dx = (x1 - x0) / cols as f64;
        chart.draw_series(panel.cells.iter().enumerate().flat_map(|(j, col)| {
            col.iter().enumerate().map(move |(r, &v)| {
                let xa = x0 + j as f64 * dx;
                Rectangle::new([(xa, r as f64 - 0.5), (xa + dx, r as f64 + 0.5)], diverging(v).filled())
            })
        }))?;
    }
    // The colour scale: a bar from 0 to SCALE_MAX with its ticks and meaning.
    let mut scale = ChartBuilder::on(&scale_area)
        .margin_top(30)
        .margin_bottom(50)
        .margin_left(40)
        .right_y_label_area_size(70)
        .build_cartesian_2d(0f64..1f64, 0f64..SCALE_MAX)?;
    // The bar first: the tick labels are drawn over its edge.
    let steps = 100;
    scale.draw_series((0..steps).map(|k| {
        let (a, b) = (k as f64 * SCALE_MAX / steps as f64, (k + 1) as f64 * SCALE_MAX / steps as f64);
        Rectangle::new([(0.0, a), (1.0, b)], diverging(0.5 * (a + b)).filled())
    }))?;
    scale
        .configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_desc(&h.scale_label)
        .label_style((FONT, 12))
        .axis_desc_style((FONT, 13))
        .y_labels(5)
        .y_label_formatter(&|v| if *v >= SCALE_MAX { format!("≥{}", tick(*v)) } else { tick(*v) })
        .draw()?;
    Ok(())
}

fn draw_bars<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, b: &Bars) -> Drawn
where
    DB::ErrorType: 'static,
{
    let (w, _) = root.dim_in_pixel();
    let entries: Vec<(String, RGBColor)> = b.parts.iter().enumerate().map(|(i, p)| (p.clone(), PALETTE[i % PALETTE.len()])).collect();
    let body = root.titled(&b.title, (FONT, 22))?;
    let (legend, plot) = body.split_vertically(8 + 20 * legend_rows(&entries, w));
    legend_strip(&legend, &entries)?;
    let n = b.values.len().max(1);
    let top = b.values.iter().map(|v| v.iter().sum::<f64>()).fold(0.0, f64::max);
    let lines = b.labels.iter().map(|l| l.len()).max().unwrap_or(0) as u32;
    let mut chart = ChartBuilder::on(&plot)
        .margin(14)
        .x_label_area_size(14 + 16 * lines)
        .y_label_area_size(78)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, axis(0.0, top))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(&b.y_label)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 15))
        .y_label_formatter(&|v| tick(*v))
        .light_line_style(RGBColor(240, 240, 240))
        .draw()?;
    for (p, (_, colour)) in entries.iter().enumerate() {
        chart.draw_series(b.values.iter().enumerate().map(|(i, parts)| {
            let below: f64 = parts[..p].iter().sum();
            let x = i as f64;
            Rectangle::new([(x - 0.32, below), (x + 0.32, below + parts[p])], colour.filled())
        }))?;
    }
    for (i, label) in b.labels.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(i as f64, 0.0));
        for (k, line) in label.iter().enumerate() {
            root.draw(&Text::new(line.clone(), (px, py + 8 + 16 * k as i32), text_style(12, HPos::Center, VPos::Top)))?;
        }
    }
    Ok(())
}

fn draw_timeline<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, t: &Timeline) -> Drawn
where
    DB::ErrorType: 'static,
{
    let (w, _) = root.dim_in_pixel();
    let body = root.titled(&t.title, (FONT, 22))?;
    let (legend, plot) = body.split_vertically(8 + 20 * legend_rows(&t.kinds, w));
    legend_strip(&legend, &t.kinds)?;
    let rows = t.rows.len().max(1);
    let end = t.spans.iter().map(|s| s.end).fold(0.0, f64::max);
    let mut chart = ChartBuilder::on(&plot)
        .margin(14)
        .x_label_area_size(46)
        .y_label_area_size(150)
        .build_cartesian_2d(0f64..end.max(1e-9), 0f64..rows as f64)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_desc(&t.x_label)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 15))
        .x_label_formatter(&|v| tick(*v))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    // Row 0 at the top.
    let y = |row: usize| (rows - 1 - row) as f64;
    chart.draw_series(t.spans.iter().map(|s| {
        let colour = t.kinds.get(s.kind).map_or(BLACK, |k| k.1);
        Rectangle::new([(s.start, y(s.row) + 0.12), (s.end, y(s.row) + 0.88)], colour.filled())
    }))?;
    for s in t.spans.iter().filter(|s| !s.text.is_empty()) {
        let (a, yy) = chart.backend_coord(&(s.start, y(s.row) + 0.5));
        let (b, _) = chart.backend_coord(&(s.end, 0.0));
        if (b - a) as usize > 7 * s.text.chars().count() + 4 {
            root.draw(&Text::new(s.text.clone(), ((a + b) / 2, yy), text_style(11, HPos::Center, VPos::Center)))?;
        }
    }
    for (r, name) in t.rows.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(0.0, y(r) + 0.5));
        root.draw(&Text::new(name.clone(), (px - 8, py), text_style(13, HPos::Right, VPos::Center)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    fn lines() -> Chart {
        Chart::Lines(Lines {
            title: "Training loss".into(),
            x_label: "step".into(),
            y_label: "loss (nats / token)".into(),
            series: vec![Series { name: "train".into(), points: (1..20).map(|i| (i as f64, 5.0 / i as f64)).collect() }],
        })
    }

    #[test]
    fn a_png_decodes_at_its_size_and_is_not_blank() {
        let c = lines();
        let (w, h, rgb) = decode(&c.render(Format::Png).unwrap());
        assert_eq!((w, h), c.size());
        let inked = rgb.chunks(3).filter(|p| p != &[255, 255, 255]).count();
        assert!(inked > 2000, "{inked} non-white pixels");
    }

    #[test]
    fn an_svg_holds_its_titles_and_legend_as_text() {
        let svg = String::from_utf8(lines().render(Format::Svg).unwrap()).unwrap();
        for s in ["Training loss", "step", "loss (nats / token)", "train"] {
            assert!(svg.contains(&format!(">\n{s}\n<")) || svg.contains(&format!(">{s}<")), "`{s}` missing");
        }
    }

    #[test]
    fn the_colour_scale_is_blue_white_red() {
        assert_eq!(diverging(1.0), RGBColor(247, 247, 247));
        assert_eq!(diverging(0.0), RGBColor(33, 64, 154));
        assert_eq!(diverging(5.0), RGBColor(178, 24, 43));
    }

    #[test]
    fn ticks_use_few_digits() {
        assert_eq!(tick(0.0), "0");
        assert_eq!(tick(2.5), "2.5");
        assert_eq!(tick(12000.0), "12000");
        assert_eq!(tick(0.0003), "0.0003");
        assert_eq!(tick(0.00002), "2.0e-5");
    }

    #[test]
    fn formats_parse_and_follow_the_file_name() {
        assert_eq!(Format::parse("SVG").unwrap(), Format::Svg);
        assert!(Format::parse("jpg").is_err());
        assert_eq!(Format::of_path(Path::new("a/b.svg")), Format::Svg);
        assert_eq!(Format::of_path(Path::new("a/b.png")), Format::Png);
    }
}
