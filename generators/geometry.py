"""Vector truth of a grain specimen with shapely: exact grain polygons and a per-grain table.

The cells of a Voronoi/Laguerre tessellation are convex polygons; their vertices come from
:func:`generators.substructure.cell_polygons` (exact clipping by radical half-planes) and are
turned into :class:`shapely.Polygon` objects here.  Coordinates are **specimen** px (the frame of
the seeds; a periodic cell is given in the frame of its seed and may stick out of ``[0, L)``).
Per-pixel work stays in Numba; shapely is used only for the vector quantities.

Storage (``/geometry/<name>`` rows are numeric):

- ``grain_table`` rows ``(grain_id, area_px2, perimeter_px, equivalent_diameter_px)`` with the
  equivalent diameter ``2 √(A / π)``;
- ``grain_polygons`` rows ``(grain_id, x, y)``: the vertices of each polygon in order
  (counter-clockwise, not closed); :func:`polygons_from_rows` rebuilds the shapely polygons and
  ``polygon.wkb`` gives the WKB.
"""

from __future__ import annotations

import math

import numpy as np
import shapely

from generators.substructure import CellPolygons

__all__ = ["grain_polygons", "grain_table", "polygon_rows", "polygons_from_rows",
           "TABLE_COLUMNS"]

TABLE_COLUMNS = ("grain_id", "area_px2", "perimeter_px", "equivalent_diameter_px")


def grain_polygons(cells: CellPolygons, ids: np.ndarray | None = None) -> list:
    """Shapely polygons of cells ``ids`` (default: all), specimen px.

    Empty Laguerre cells give empty polygons.  On a bounded (non-periodic) specimen the cells
    are clipped to it, ``[0, Lx] × [0, Ly]`` (the polygon search bounds them by a margin box
    beyond it, where there is no grain).
    """
    ids = np.arange(cells.n_cells) if ids is None else np.asarray(ids, dtype=np.int64)
    box = None if cells.periodic else shapely.box(0.0, 0.0, *cells.extent)
    out = []
    for i in ids:
        v = cells.polygon(int(i))
        poly = shapely.Polygon(v) if len(v) >= 3 else shapely.Polygon()
        if box is not None and not poly.is_empty:
            poly = poly.intersection(box)  # convex ∩ box: convex (or empty)
            if not isinstance(poly, shapely.Polygon):
                poly = shapely.Polygon()
        out.append(poly)
    return out


def grain_table(ids: np.ndarray, polygons: list) -> np.ndarray:
    """Rows ``(grain_id, area, perimeter, equivalent diameter)`` (k, 4) float64, px units."""
    ids = np.asarray(ids, dtype=np.float64)
    if len(polygons) != len(ids):
        raise ValueError("one polygon per grain id is needed")
    arr = np.asarray(polygons, dtype=object)
    area = shapely.area(arr).astype(np.float64) if len(arr) else np.zeros(0)
    perim = shapely.length(arr).astype(np.float64) if len(arr) else np.zeros(0)
    return np.c_[ids, area, perim, 2.0 * np.sqrt(area / math.pi)].reshape(-1, 4)


def polygon_rows(ids: np.ndarray, polygons: list) -> np.ndarray:
    """Vertex rows ``(grain_id, x, y)`` (m, 3) float64 of the polygons' exteriors (not closed)."""
    rows = []
    for g, p in zip(np.asarray(ids), polygons):
        if p.is_empty:
            continue
        xy = np.asarray(p.exterior.coords)[:-1]
        rows.append(np.c_[np.full(len(xy), float(g)), xy])
    return np.concatenate(rows) if rows else np.zeros((0, 3))


def polygons_from_rows(rows: np.ndarray) -> dict[int, "shapely.Polygon"]:
    """Inverse of :func:`polygon_rows`: grain id → shapely polygon (use ``.wkb`` for WKB)."""
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
    out: dict[int, shapely.Polygon] = {}
    if not len(rows):
        return out
    ids = rows[:, 0]
    cut = np.nonzero(np.diff(ids))[0] + 1
    for chunk in np.split(rows, cut):
        out[int(chunk[0, 0])] = shapely.Polygon(chunk[:, 1:])
    return out
