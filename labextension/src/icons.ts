import { LabIcon } from '@jupyterlab/ui-components';

/** A packed box: the side bar's tab icon. `jp-icon3` lets every theme recolour it. */
const environmentsSvg = `<svg xmlns="http://www.w3.org/2000/svg" width="24" height="24" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <path d="M12 2 3 6.5v11L12 22l9-4.5v-11L12 2zm0 2.24 6.55 3.27L12 10.8 5.45 7.51 12 4.24zM5 9.12l6 3v7.6l-6-3v-7.6zm8 10.6v-7.6l6-3v7.6l-6 3z"/>
  </g>
</svg>`;

export const environmentsIcon = new LabIcon({
  name: 'kernelprov:environments',
  svgstr: environmentsSvg
});
