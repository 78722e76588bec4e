"""CSV and Markdown tables of run folders."""

import pandas as pd

from personalab.figures.tables import write_csv


def test_csv_writes_whole_numbers_as_integers_and_floats_without_noise(tmp_path):
    frame = pd.DataFrame(
        {
            "step": [0, 20],
            "layer": [3, None],  # pandas makes this float: 3.0 and NaN
            "score": [0.1 + 0.2, 80.00000000000001],
            "alpha": [0.5, 1.0],
        }
    )
    assert frame["layer"].dtype == float
    write_csv(frame, tmp_path / "t.csv")
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines == ["step,layer,score,alpha", "0,3,0.3,0.5", "20,,80,1"]
    back = pd.read_csv(tmp_path / "t.csv")
    assert back["layer"].iloc[0] == 3 and back["score"].iloc[1] == 80.0
