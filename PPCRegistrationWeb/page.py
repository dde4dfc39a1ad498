"""The page (Vuetify 3 through trame): the controls in the drawer, the two Slicer views, the status, the plots
and the ranked correspondences; a "busy" page for a second tab.  Element ids (``id=``) are what the browser
test uses."""

from __future__ import annotations


def _file_input(app, kind: str, label: str, accept: str, ident: str):
    from trame.widgets import vuetify3 as v

    limit = app.upload_limit
    trigger = "ppcreg_upload"  # the triggers are registered by PPCRegistrationApp
    # the size is checked in the page first, so that an oversized file is not sent at all
    check = (f"($event.target.files && $event.target.files[0] && $event.target.files[0].size > {limit}) ? "
             f"(error = $event.target.files[0].name + ': ' + Math.round($event.target.files[0].size / 1048576) + "
             f"' MB is over the upload limit of {round(limit / 1048576)} MB (PPCREG_UPLOAD_LIMIT_MB)') : "
             f"trigger('{trigger}', ['{kind}', Array.from($event.target.files)]); "
             # cleared, so that choosing the same file again (after fixing the geometry, say) is a change too
             "$event.target.value = ''")
    v.VFileInput(label=label, accept=accept, density="compact", hide_details=True, show_size=True,
                 prepend_icon="mdi-upload", change=check, disabled=("busy || running",), id=ident,
                 classes="mb-2")


def build_page(app):
    from trame.widgets import client, html
    from trame.widgets import vuetify3 as v
    from trame_vuetify.ui.vuetify3 import SinglePageWithDrawerLayout

    from .app import HEARTBEAT_JS, POSE_KEYS

    server = app.server
    with SinglePageWithDrawerLayout(server, full_height=True) as layout:
        client.Script(HEARTBEAT_JS)
        layout.title.set_text("PPCRegistration")
        layout.root.theme = "dark"
        with layout.toolbar:
            v.VSpacer()
            html.Div("{{ info }}", id="info", classes="text-body-2 mr-4", v_show="owner && owner === me")
            html.Span("{{ stop_at }}", id="stop-at", style="display: none;")
            v.VProgressLinear(model_value=("progress",), indeterminate=("busy",), absolute=True, location="bottom",
                              color="primary", id="progress", v_show="owner && owner === me")
        layout.drawer.width = 380
        with layout.drawer:
            with html.Div(v_if="owner && owner === me", classes="pa-3", id="controls"):
                v.VAlert(text=("error",), v_show="error", type="error", density="compact", closable=True,
                         id="error", classes="mb-2", click_close="error = ''")
                html.Div("Case", classes="text-subtitle-1")
                v.VBtn("Load the sample CT", click=app.load_sample, id="load-sample", block=True,
                       disabled=("busy || running",), classes="mb-2")
                _file_input(app, "ct", "CT (NIfTI, NRRD, MHA, zipped DICOM)", ".nii,.gz,.nrrd,.nhdr,.mha,.zip,.dcm",
                            "upload-ct")
                _file_input(app, "labels", "its label map (vertebrae)", ".nii,.gz,.nrrd,.nhdr,.mha,.zip",
                            "upload-labels")
                _file_input(app, "xray", "X-ray (PNG, NRRD, DICOM with C-arm tags)", ".png,.nrrd,.nii,.gz,.mha,.dcm",
                            "upload-xray")
                with v.VExpansionPanels(classes="mb-2"):
                    with v.VExpansionPanel(title="X-ray geometry (when the file has none)"):
                        with v.VExpansionPanelText():
                            html.Div("Blank: from the DICOM tags. Set before uploading the X-ray.",
                                     classes="text-caption")
                            with v.VRow(dense=True):
                                for key, label in (("spacing", "pixel (mm)"), ("sdd", "source-detector (mm)"),
                                                   ("sid", "source-isocentre (mm)"), ("primary", "LAO+/RAO- (°)"),
                                                   ("secondary", "CRA+/CAU- (°)")):
                                    with v.VCol(cols=6):
                                        v.VTextField(v_model=(f"geo_{key}",), label=label, density="compact",
                                                     hide_details=True, id=f"geometry-{key}")
                html.Div("CT: {{ ct_desc || 'none' }}", id="ct-desc", classes="text-caption")
                html.Div("X-ray: {{ case_desc || 'none' }}", id="case-desc", classes="text-caption mb-2")
                v.VSelect(label="vertebra (region of interest)", items=("vertebrae",), v_model=("vertebra",),
                          density="compact", hide_details=True, id="vertebra", classes="mb-2",
                          disabled=("busy || running",))
                with v.VExpansionPanels(classes="mb-2"):
                    with v.VExpansionPanel(title="or a region-of-interest box (mm, RAS)"):
                        with v.VExpansionPanelText():
                            with v.VRow(dense=True):
                                for i, name in enumerate(("x", "y", "z", "width", "height", "depth")):
                                    with v.VCol(cols=4):
                                        v.VTextField(v_model=(f"box_{i}",), label=name, type="number",
                                                     density="compact", hide_details=True, id=f"box-{i}")
                            v.VBtn("centre on the vertebra", click=app.box_from_vertebra, size="small")
                            v.VBtn("use the box", click=app.use_box, size="small", id="use-box")
                html.Div("Simulate an X-ray (with its ground truth)", classes="text-subtitle-1")
                v.VSlider(label="initial error (mm)", v_model=("sim_mtre",), min=0, max=45, step=0.5,
                          thumb_label=True, density="compact", hide_details=True, id="sim-mtre")
                v.VSlider(label="LAO/RAO (°)", v_model=("sim_primary",), min=-90, max=90, step=1, thumb_label=True,
                          density="compact", hide_details=True)
                v.VSlider(label="CRA/CAU (°)", v_model=("sim_secondary",), min=-40, max=40, step=1,
                          thumb_label=True, density="compact", hide_details=True)
                v.VTextField(label="seed", v_model=("sim_seed",), type="number", density="compact", hide_details=True)
                v.VBtn("Simulate X-ray", click=app.simulate, id="simulate", block=True, classes="my-2",
                       disabled=("busy || running || !ct_desc",))
                html.Div("Initial pose (about the region's centre)", classes="text-subtitle-1")
                for key, label, lim in zip(POSE_KEYS, ("rot x (°)", "rot y (°)", "rot z (°)", "x (mm)", "y (mm)",
                                                       "z (mm)"), (20, 20, 20, 50, 50, 50)):
                    v.VSlider(label=label, v_model=(key,), min=-lim, max=lim, step=0.5, thumb_label=True,
                              density="compact", hide_details=True, disabled=("!has_case || running",))
                html.Div("Registration", classes="text-subtitle-1")
                v.VSelect(label="method", items=("methods",), v_model=("method",), density="compact",
                          hide_details=True, id="method", disabled=("running",))
                v.VSelect(label="device", items=("devices",), v_model=("device",), density="compact",
                          hide_details=True, disabled=("running",))
                v.VCheckbox(label="intensity refinement", v_model=("refine",), density="compact", hide_details=True)
                with html.Div(classes="d-flex ga-1 my-2"):
                    v.VBtn("Step", click=app.step, id="step", disabled=("!has_case || busy || running",))
                    v.VBtn("Run", click=app.run, id="run", color="primary",
                           disabled=("!has_case || busy || running",))
                    v.VBtn("Stop", click=app.stop, id="stop", color="error", disabled=("!running",))
                    v.VBtn("Reset", click=app.reset, id="reset", disabled=("!has_case || busy || running",))
                v.VSlider(label="DRR opacity", v_model=("opacity",), min=0, max=1, step=0.05, density="compact",
                          hide_details=True)
                html.Div("Download", classes="text-subtitle-1")
                with html.Div(classes="d-flex ga-1 flex-wrap"):
                    v.VBtn("transform.json", size="small", id="dl-json", disabled=("!has_result",),
                           click=("utils.download('transform.json', trigger('ppcreg_download', ['json']), "
                                  "'application/json')"))
                    v.VBtn("transform.h5", size="small", id="dl-h5", disabled=("!has_result",),
                           click=("utils.download('transform.h5', trigger('ppcreg_download', ['h5']), "
                                  "'application/octet-stream')"))
                    v.VBtn("screenshot", size="small", id="dl-png", disabled=("!has_result",),
                           click="utils.download('ppcregistration.png', trigger('ppcreg_screenshot'), 'image/png')")

        with layout.content:
            with html.Div(v_if="owner && owner === me", classes="d-flex flex-column", style="height: 100%;"):
                with html.Div(style="height: 560px; flex: none;", id="views"):
                    app.layout_manager.initialize_layout_grid(layout)
                with html.Div(classes="d-flex flex-wrap pa-2 ga-4", id="panel"):
                    with v.VTable(density="compact", id="status", style="min-width: 260px;"):
                        with html.Tbody():
                            for key, label in (("iteration", "iteration"), ("update", "update"),
                                               ("contour", "contour points"), ("weight", "mean weight"),
                                               ("time", "time per update"), ("similarity", "similarity (GC)"),
                                               ("mtre", "mTRE"), ("state", "status"), ("run_seconds", "run time")):
                                with html.Tr():
                                    html.Td(label)
                                    html.Td(f"{{{{ status.{key} ?? '-' }}}}", id=f"status-{key}")
                    html.Div(v_html=("plot_svg",), v_show="plot_svg", id="plot", style="align-self: flex-start;")
                    with html.Div(v_show="hist_svg", style="align-self: flex-start;"):
                        html.Div(v_html=("hist_svg",), id="weights-hist")
                        with v.VTable(density="compact", id="ranked"):
                            with html.Thead():
                                with html.Tr():
                                    for h in ("rank by weight", "weight", "u (px)", "v (px)", "shift (px)"):
                                        html.Th(h)
                            with html.Tbody():
                                with html.Tr(v_for="row in ranked", key="row.rank"):
                                    for k in ("rank", "weight", "u", "v", "shift"):
                                        html.Td(f"{{{{ row.{k} }}}}")
            with html.Div(v_if="!owner || owner !== me", classes="pa-8", id="busy-page"):
                html.H2("PPCRegistration is in use")
                html.P("Another browser tab (or another user) has this registration session open. Close it there, "
                       "or wait here: this page takes over about 10 seconds after that tab is closed.")
    return layout
