/**
 * kernelprov's JupyterLab panel: the packed environments this server can start, whether each is
 * staged on this node, and actions on them. The data comes from the server extension's
 * `/kernelprov/envs` API (kernelprov/routes.py).
 */
import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { Dialog, showDialog, showErrorMessage } from '@jupyterlab/apputils';
import { IDocumentManager } from '@jupyterlab/docmanager';
import { IDefaultFileBrowser } from '@jupyterlab/filebrowser';
import { ITranslator, nullTranslator } from '@jupyterlab/translation';
import {
  CommandToolbarButton,
  refreshIcon,
  SidePanel
} from '@jupyterlab/ui-components';
import { Message } from '@lumino/messaging';
import { Panel, Widget } from '@lumino/widgets';

import { environmentsIcon } from './icons';
import { EnvironmentsModel } from './model';
import { EnvironmentsView, IEnvironmentActions } from './panel';
import { IEnvironment } from './request';

const PANEL_ID = 'kernelprov-environments';
const REFRESH_COMMAND = 'kernelprov:refresh-environments';

/**
 * The side panel: polls only while it is visible.
 */
class EnvironmentsPanel extends SidePanel {
  constructor(model: EnvironmentsModel, options: SidePanel.IOptions) {
    super(options);
    this._model = model;
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    this._model.visible = true;
  }

  protected onAfterHide(msg: Message): void {
    super.onAfterHide(msg);
    this._model.visible = false;
  }

  dispose(): void {
    this._model.dispose();
    super.dispose();
  }

  private _model: EnvironmentsModel;
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'kernelprov:environments',
  description:
    'A side panel with the packed conda environments of kernelprov and their state on this node.',
  autoStart: true,
  requires: [IDocumentManager],
  optional: [ILayoutRestorer, ITranslator, IDefaultFileBrowser],
  activate: (
    app: JupyterFrontEnd,
    docManager: IDocumentManager,
    restorer: ILayoutRestorer | null,
    translator: ITranslator | null,
    fileBrowser: IDefaultFileBrowser | null
  ): void => {
    translator = translator ?? nullTranslator;
    const trans = translator.load('kernelprov');
    const { serviceManager } = app;
    const model = new EnvironmentsModel(serviceManager.serverSettings);

    const actions: IEnvironmentActions = {
      openNotebook: async (env: IEnvironment) => {
        try {
          const file = await docManager.newUntitled({
            path: fileBrowser?.model.path ?? '',
            type: 'notebook'
          });
          docManager.open(file.path, 'default', { name: env.name });
        } catch (reason) {
          void showErrorMessage(
            trans.__('Cannot open a notebook on %1', env.display_name),
            reason as Error
          );
        }
      },
      stage: async (env: IEnvironment) => {
        try {
          await model.stage(env.name);
        } catch (reason) {
          void showErrorMessage(
            trans.__('Cannot stage %1', env.display_name),
            reason as Error
          );
        }
      },
      evict: async (env: IEnvironment) => {
        const result = await showDialog({
          title: trans.__('Evict %1?', env.display_name),
          body: trans.__(
            'Its staged copy on this node is removed; the next kernel start unpacks it again.'
          ),
          buttons: [
            Dialog.cancelButton({ label: trans.__('Cancel') }),
            Dialog.warnButton({ label: trans.__('Evict') })
          ]
        });
        if (!result.button.accept) {
          return;
        }
        try {
          await model.evict(env.name);
        } catch (reason) {
          void showErrorMessage(
            trans.__('Cannot evict %1', env.display_name),
            reason as Error
          );
        }
      }
    };

    const panel = new EnvironmentsPanel(model, {
      content: new Panel(),
      translator
    });
    panel.id = PANEL_ID;
    panel.addClass('jp-kernelprov-panel');
    panel.title.icon = environmentsIcon;
    panel.title.caption = trans.__('Environments');
    panel.node.setAttribute('role', 'region');
    panel.node.setAttribute('aria-label', trans.__('Environments'));

    const heading = new Widget({ node: document.createElement('h2') });
    heading.node.textContent = trans.__('Environments');
    heading.addClass('jp-kernelprov-title');
    panel.header.addWidget(heading);
    app.commands.addCommand(REFRESH_COMMAND, {
      label: trans.__('Refresh Environments'),
      caption: trans.__('Refresh the list of environments'),
      icon: refreshIcon,
      execute: async () => {
        await serviceManager.kernelspecs.refreshSpecs();
        await model.refresh();
      }
    });
    panel.toolbar.addItem(
      'refresh',
      new CommandToolbarButton({
        commands: app.commands,
        id: REFRESH_COMMAND,
        label: ''
      })
    );
    panel.addWidget(new EnvironmentsView(model, actions, trans));

    app.shell.add(panel, 'left', { rank: 650 });
    if (restorer) {
      restorer.add(panel, PANEL_ID);
    }
    // Kernels installed or removed (`kernelprov install/remove`) show up here too.
    serviceManager.kernelspecs.specsChanged.connect(() => void model.refresh());
    void model.start();
  }
};

export default plugin;
